/*
 * files: open file descriptions that must survive with their offsets, flags and identity.
 *
 *   files TRIGGER DIR [dup]
 *
 * DIR holds input.txt (made by the test, at least 20000 bytes). The program chdirs to DIR,
 * sets umask 027 and opens:
 *   fd 10  input.txt O_RDONLY, read 1000 bytes, lseek to 5000, read 3000 (offset 8000)
 *   fd 11  out.dat   O_RDWR|O_CREAT|O_TRUNC: pwrite at 100000, write at 0 and at 50 (offset 55)
 *   fd 12  log.txt   O_WRONLY|O_APPEND|O_CREAT: two lines, then lseek to 0
 *   fd 13  /dev/null O_WRONLY, fd 14 /dev/zero O_RDONLY, fd 15 /dev/urandom O_RDONLY|O_CLOEXEC
 *   fd 16  input.txt O_RDONLY|O_CLOEXEC, 10 bytes read
 *   fd 17  input.txt O_RDONLY|O_NONBLOCK, lseek to 777
 *   with "dup": fd 18 = dup(10) (one open file description, one shared offset)
 * Phase 2 checks flags, offsets and identities, then continues reading and writing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static void die(const char *what)
{
	fprintf(stderr, "files: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t fnv(const void *data, size_t n)
{
	const uint8_t *p = data;
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void at(int want, const char *path, int flags)
{
	int got = open(path, flags, 0666);
	if (got < 0)
		die(path);
	if (got != want) {
		if (dup3(got, want, flags & O_CLOEXEC) != want)
			die("dup3");
		close(got);
	}
}

static void must_write(int fd, const char *s)
{
	if (write(fd, s, strlen(s)) != (ssize_t)strlen(s))
		die("write");
}

#define FIRST 10
#define LAST 18
static int getfl[LAST + 1], getfd[LAST + 1];
static struct stat st[LAST + 1];

static void snapshot(int nfds_last)
{
	for (int fd = FIRST; fd <= nfds_last; fd++) {
		getfl[fd] = fcntl(fd, F_GETFL);
		getfd[fd] = fcntl(fd, F_GETFD);
		fstat(fd, &st[fd]);
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: files TRIGGER DIR [dup]\n");
		return 2;
	}
	int dup_mode = argc > 3 && strcmp(argv[3], "dup") == 0;
	int last = dup_mode ? 18 : 17;
	char buf[65536], cwd1[4096], cwd2[4096];
	if (chdir(argv[2]))
		die("chdir");
	umask(027);
	if (!getcwd(cwd1, sizeof cwd1))
		die("getcwd");

	at(10, "input.txt", O_RDONLY);
	ssize_t n = read(10, buf, 1000);
	printf("input first %zd bytes %016llx\n", n, (unsigned long long)fnv(buf, n));
	lseek(10, 5000, SEEK_SET);
	n = read(10, buf, 3000);
	printf("input at 5000 %zd bytes %016llx\n", n, (unsigned long long)fnv(buf, n));

	at(11, "out.dat", O_RDWR | O_CREAT | O_TRUNC);
	if (pwrite(11, "P1-AT-100000\n", 13, 100000) != 13)
		die("pwrite");
	must_write(11, "phase1 header\n");
	lseek(11, 50, SEEK_SET);
	must_write(11, "at50\n");

	at(12, "log.txt", O_WRONLY | O_APPEND | O_CREAT);
	must_write(12, "log phase1 a\n");
	must_write(12, "log phase1 b\n");
	lseek(12, 0, SEEK_SET);

	at(13, "/dev/null", O_WRONLY);
	at(14, "/dev/zero", O_RDONLY);
	at(15, "/dev/urandom", O_RDONLY | O_CLOEXEC);
	at(16, "input.txt", O_RDONLY | O_CLOEXEC);
	n = read(16, buf, 10);
	printf("fd 16 read %zd\n", n);
	at(17, "input.txt", O_RDONLY | O_NONBLOCK);
	lseek(17, 777, SEEK_SET);
	if (dup_mode) {
		if (dup2(10, 18) != 18)
			die("dup2");
		n = read(18, buf, 500); /* moves fd 10's offset too: 8500 */
		printf("fd 18 read %zd, fd 10 now at %lld\n", n, (long long)lseek(10, 0, SEEK_CUR));
	}
	snapshot(last);
	for (int fd = FIRST; fd <= last; fd++)
		printf("fd %d flags %#o cloexec %d offset %lld\n", fd, getfl[fd], getfd[fd],
		       (long long)lseek(fd, 0, SEEK_CUR));
	printf("ready\n");
	fflush(stdout);
	wait_trigger(argv[1]);

	/* ---- phase 2 ---- */
	for (int fd = FIRST; fd <= last; fd++) {
		struct stat now;
		int fl = fcntl(fd, F_GETFL), fdf = fcntl(fd, F_GETFD);
		int same = fstat(fd, &now) == 0 && now.st_dev == st[fd].st_dev && now.st_ino == st[fd].st_ino &&
			   now.st_rdev == st[fd].st_rdev;
		printf("fd %d flags %#o cloexec %d offset %lld file %s%s\n", fd, fl, fdf,
		       (long long)lseek(fd, 0, SEEK_CUR), same ? "same" : "DIFFERENT",
		       fl == getfl[fd] && fdf == getfd[fd] ? "" : " FLAGS CHANGED");
	}
	int fd_after = open("/dev/null", O_RDONLY); /* lowest free fd: nothing else is open */
	printf("next free fd %d\n", fd_after);
	close(fd_after);
	if (!getcwd(cwd2, sizeof cwd2))
		die("getcwd");
	printf("cwd: %s\n", strcmp(cwd1, cwd2) == 0 ? "same" : "DIFFERENT");
	mode_t old = umask(022);
	printf("umask %03o\n", (unsigned)old);

	if (dup_mode) {
		n = read(18, buf, 100);
		printf("fd 18 read %zd, fd 10 now at %lld\n", n, (long long)lseek(10, 0, SEEK_CUR));
	}
	uint64_t h = 0;
	size_t total = 0;
	while ((n = read(10, buf, sizeof buf)) > 0) {
		h = h * 31 + fnv(buf, n);
		total += n;
	}
	printf("input rest %zu bytes %016llx\n", total, (unsigned long long)h);
	n = read(16, buf, 10);
	printf("fd 16 next 10: %016llx\n", (unsigned long long)fnv(buf, n));
	n = read(17, buf, 100);
	printf("fd 17 at 777: %016llx\n", (unsigned long long)fnv(buf, n));

	memset(buf, 1, 4096);
	n = read(14, buf, 4096);
	int zeros = n == 4096;
	for (int i = 0; i < 4096; i++)
		zeros = zeros && buf[i] == 0;
	printf("/dev/zero: %s\n", zeros ? "zeros" : "BROKEN");
	printf("/dev/null: wrote %zd\n", write(13, buf, 100));
	printf("/dev/urandom: read %zd\n", read(15, buf, 16));

	must_write(11, "phase2 continues\n");
	if (pwrite(11, "P2-AT-200000\n", 13, 200000) != 13)
		die("pwrite");
	must_write(12, "log phase2\n");
	printf("log offset after append %lld\n", (long long)lseek(12, 0, SEEK_CUR));

	struct stat sb;
	stat("out.dat", &sb);
	printf("out.dat mode %03o size %lld\n", (unsigned)(sb.st_mode & 0777), (long long)sb.st_size);
	int fd = open("new.dat", O_WRONLY | O_CREAT | O_TRUNC, 0666);
	fstat(fd, &sb);
	printf("new.dat mode %03o\n", (unsigned)(sb.st_mode & 0777));
	close(fd);
	for (fd = FIRST; fd <= last; fd++)
		if (close(fd))
			printf("close %d: %s\n", fd, strerror(errno));
	printf("done\n");
	return 0;
}
