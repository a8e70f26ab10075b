/*
 * memory: heap, private and shared anonymous mappings, a sparse mapping, a private file mapping
 * written to (copy-on-write) and read-only file mappings, all with known contents.
 *
 *   memory TRIGGER DIR [ANON_MIB]
 *
 * Phase 1 builds the state and prints checksums; phase 2 (after TRIGGER appears) verifies every
 * byte, checks protections, argv, the executable, brk and MAP_SHARED semantics, then rewrites
 * everything and verifies again.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define NBLOCKS 3000
#define NBIG 3

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static void die(const char *what)
{
	fprintf(stderr, "memory: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* Deterministic contents: byte i of a region with seed s. */
static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
	size_t i;
	for (i = 0; i + 8 <= n; i += 8) {
		uint64_t v = mix(seed * 0x9E3779B97F4A7C15ULL + i);
		memcpy(p + i, &v, 8);
	}
	for (; i < n; i++)
		p[i] = (uint8_t)mix(seed * 0x9E3779B97F4A7C15ULL + i);
}

/* Number of bytes that differ from fill(seed). */
static size_t verify(const uint8_t *p, size_t n, uint64_t seed)
{
	size_t bad = 0, i, k;
	for (i = 0; i + 8 <= n; i += 8) {
		uint64_t v = mix(seed * 0x9E3779B97F4A7C15ULL + i);
		if (memcmp(p + i, &v, 8) != 0)
			for (k = 0; k < 8; k++)
				bad += p[i + k] != ((uint8_t *)&v)[k];
	}
	for (; i < n; i++)
		bad += p[i] != (uint8_t)mix(seed * 0x9E3779B97F4A7C15ULL + i);
	return bad;
}

static size_t count_nonzero(const uint8_t *p, size_t n)
{
	size_t bad = 0;
	for (size_t i = 0; i < n; i++)
		bad += p[i] != 0;
	return bad;
}

static uint64_t fnv(const void *data, size_t n, uint64_t h)
{
	const uint8_t *p = data;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}
#define FNV0 0xcbf29ce484222325ULL

static void write_file(const char *path, size_t n, uint64_t seed)
{
	uint8_t *buf = malloc(n);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (!buf || fd < 0)
		die(path);
	fill(buf, n, seed);
	if (write(fd, buf, n) != (ssize_t)n)
		die("write");
	close(fd);
	free(buf);
}

static void *map_file(const char *path, size_t len, off_t off, int prot)
{
	int fd = open(path, prot & PROT_WRITE ? O_RDWR : O_RDONLY);
	if (fd < 0)
		die(path);
	void *p = mmap(NULL, len, prot, MAP_PRIVATE, fd, off);
	if (p == MAP_FAILED)
		die("mmap file");
	close(fd);
	return p;
}

/* A page of a recognisable pattern in .bss, so that an image's page data can be located. */
static char marker[2 * PAGE];

static sigjmp_buf fault_jmp;
static void on_segv(int sig)
{
	(void)sig;
	siglongjmp(fault_jmp, 1);
}

static const char *probe(volatile uint8_t *p, int write)
{
	if (sigsetjmp(fault_jmp, 1))
		return "fault";
	if (write)
		*p = *p;
	else
		(void)*p;
	return "ok";
}

struct block {
	uint8_t *p;
	size_t n;
	int live;
};

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: memory TRIGGER DIR [ANON_MIB]\n");
		return 2;
	}
	const char *trigger = argv[1];
	size_t anon_len = (argc > 3 ? strtoul(argv[3], NULL, 0) : 16) << 20;
	char cow_path[4096], ro_path[4096], exe[4096], exe2[4096];
	snprintf(cow_path, sizeof cow_path, "%s/cow.dat", argv[2]);
	snprintf(ro_path, sizeof ro_path, "%s/ro.dat", argv[2]);
	ssize_t exe_len = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (exe_len < 0)
		die("readlink");
	exe[exe_len] = 0;

	for (size_t i = 0; i < sizeof marker; i += 16)
		memcpy(marker + i, "UMIG-PAGE-MARK!\n", 16);

	/* heap: many sizes through malloc (brk) plus a few large blocks (malloc's own mmap) */
	static struct block blocks[NBLOCKS + NBIG];
	uint64_t r = 12345;
	for (int i = 0; i < NBLOCKS + NBIG; i++) {
		r = mix(r + i);
		size_t n = i >= NBLOCKS ? ((size_t)(i - NBLOCKS + 1) << 20) + 123
			   : i % 100 == 0 ? 20000 + r % 200000 : 1 + r % 4096;
		blocks[i].p = malloc(n);
		if (!blocks[i].p)
			die("malloc");
		blocks[i].n = n;
		blocks[i].live = 1;
		fill(blocks[i].p, n, 1000 + i);
	}
	for (int i = 0; i < NBLOCKS; i += 3) { /* holes in the heap */
		free(blocks[i].p);
		blocks[i].live = 0;
	}
	uint64_t h = FNV0;
	for (int i = 0; i < NBLOCKS + NBIG; i++)
		if (blocks[i].live)
			h = fnv(blocks[i].p, blocks[i].n, h);
	printf("heap blocks %d checksum %016llx\n", NBLOCKS + NBIG, (unsigned long long)h);

	/* private anonymous: 2 of every 3 pages written, the rest never touched; the last MiB
	 * is then made read-only */
	uint8_t *anon = mmap(NULL, anon_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED)
		die("mmap anon");
	for (size_t pg = 0; pg < anon_len / PAGE; pg++)
		if (pg % 3 != 2)
			fill(anon + pg * PAGE, PAGE, 2000 + pg);
	if (mprotect(anon + anon_len - (1 << 20), 1 << 20, PROT_READ))
		die("mprotect");
	printf("anon %zu MiB checksum %016llx\n", anon_len >> 20, (unsigned long long)fnv(anon, anon_len, FNV0));

	/* a guard region */
	uint8_t *none = mmap(NULL, 16 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (none == MAP_FAILED)
		die("mmap none");
	/* pages written, then hidden: nothing may read them but /proc/PID/mem */
	uint8_t *hidden = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (hidden == MAP_FAILED)
		die("mmap hidden");
	fill(hidden, 2 * PAGE, 3200);
	fill(hidden + 3 * PAGE, PAGE, 3201);
	if (mprotect(hidden, 4 * PAGE, PROT_NONE))
		die("mprotect hidden");

	/* a big sparse reservation with three pages written */
	size_t sparse_len = 256UL << 20;
	uint8_t *sparse = mmap(NULL, sparse_len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (sparse == MAP_FAILED)
		die("mmap sparse");
	fill(sparse, PAGE, 3100);
	fill(sparse + sparse_len / 2, PAGE, 3101);
	fill(sparse + sparse_len - PAGE, PAGE, 3102);

	/* one page in each 2 MiB of 2 GiB: a page table for each page, 4 MiB of them (VmPTE) */
	size_t wide_len = 2UL << 30, wide_step = 2UL << 20;
	uint8_t *wide = mmap(NULL, wide_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (wide == MAP_FAILED)
		die("mmap wide");
	for (size_t off = 0; off < wide_len; off += wide_step)
		fill(wide + off + (off / wide_step % 512) * PAGE, PAGE, 3300 + off / wide_step);

	/* shared anonymous */
	size_t shared_len = 2UL << 20;
	uint8_t *shared = mmap(NULL, shared_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		die("mmap shared");
	fill(shared, shared_len, 3000);
	printf("shared checksum %016llx\n", (unsigned long long)fnv(shared, shared_len, FNV0));

	/* private file mapping, every fourth page written (copy-on-write) */
	size_t cow_len = 1UL << 20;
	write_file(cow_path, cow_len, 4000);
	uint8_t *cow = map_file(cow_path, cow_len, 0, PROT_READ | PROT_WRITE);
	for (size_t pg = 0; pg < cow_len / PAGE; pg += 4)
		fill(cow + pg * PAGE, PAGE, 5000 + pg);
	printf("cow checksum %016llx\n", (unsigned long long)fnv(cow, cow_len, FNV0));

	/* read-only file mappings: the whole file (last page partial) and a window at an offset */
	size_t ro_len = (256UL << 10) + 100;
	write_file(ro_path, ro_len, 6000);
	uint8_t *ro = map_file(ro_path, ro_len, 0, PROT_READ);
	uint8_t *ro_win = map_file(ro_path, 128UL << 10, 64UL << 10, PROT_READ);
	printf("ro checksum %016llx window %016llx\n", (unsigned long long)fnv(ro, ro_len, FNV0),
	       (unsigned long long)fnv(ro_win, 128UL << 10, FNV0));
	printf("marker %016llx\n", (unsigned long long)fnv(marker, sizeof marker, FNV0));
#ifdef VARIANT /* another build of the same program, for tests of file identity */
	printf("variant %d\n", VARIANT);
#endif

	printf("ready\n");
	fflush(stdout);
	wait_trigger(trigger);

	/* ---- phase 2: verify every byte ---- */
	size_t bad = 0;
	for (int i = 0; i < NBLOCKS + NBIG; i++)
		if (blocks[i].live)
			bad += verify(blocks[i].p, blocks[i].n, 1000 + i);
	printf("heap: %zu bad bytes\n", bad);
	bad = 0;
	size_t zbad = 0;
	for (size_t pg = 0; pg < anon_len / PAGE; pg++) {
		if (pg % 3 != 2)
			bad += verify(anon + pg * PAGE, PAGE, 2000 + pg);
		else
			zbad += count_nonzero(anon + pg * PAGE, PAGE);
	}
	printf("anon: %zu bad bytes, %zu bad zero bytes\n", bad, zbad);
	bad = verify(sparse, PAGE, 3100) + verify(sparse + sparse_len / 2, PAGE, 3101) +
	      verify(sparse + sparse_len - PAGE, PAGE, 3102);
	zbad = count_nonzero(sparse + PAGE, 64 * PAGE) + count_nonzero(sparse + sparse_len / 2 + PAGE, 64 * PAGE);
	printf("sparse: %zu bad bytes, %zu bad zero bytes\n", bad, zbad);
	bad = zbad = 0;
	for (size_t off = 0; off < wide_len; off += wide_step) {
		size_t page = (off / wide_step % 512) * PAGE;
		bad += verify(wide + off + page, PAGE, 3300 + off / wide_step);
		zbad += count_nonzero(wide + off + (page + PAGE) % wide_step, PAGE);
	}
	printf("wide: %zu bad bytes, %zu bad zero bytes\n", bad, zbad);
	if (mprotect(hidden, 4 * PAGE, PROT_READ))
		die("mprotect hidden back");
	bad = verify(hidden, 2 * PAGE, 3200) + verify(hidden + 3 * PAGE, PAGE, 3201);
	printf("hidden: %zu bad bytes, %zu bad zero bytes\n", bad, count_nonzero(hidden + 2 * PAGE, PAGE));
	printf("shared: %zu bad bytes\n", verify(shared, shared_len, 3000));
	bad = 0;
	for (size_t pg = 0; pg < cow_len / PAGE; pg++)
		bad += verify(cow + pg * PAGE, PAGE, pg % 4 == 0 ? 5000 + pg : 0) * (pg % 4 == 0);
	/* untouched cow pages show the file's bytes: compare with the file contents */
	{
		uint8_t *expect = malloc(cow_len);
		fill(expect, cow_len, 4000);
		for (size_t pg = 1; pg < cow_len / PAGE; pg++)
			if (pg % 4)
				for (size_t k = 0; k < PAGE; k++)
					bad += cow[pg * PAGE + k] != expect[pg * PAGE + k];
		free(expect);
	}
	printf("cow: %zu bad bytes\n", bad);
	{
		uint8_t *expect = malloc(ro_len);
		fill(expect, ro_len, 6000);
		bad = 0;
		for (size_t k = 0; k < ro_len; k++)
			bad += ro[k] != expect[k];
		for (size_t k = 0; k < (128UL << 10); k++)
			bad += ro_win[k] != expect[(64UL << 10) + k];
		free(expect);
	}
	printf("ro: %zu bad bytes\n", bad);
	bad = 0;
	for (size_t i = 0; i < sizeof marker; i += 16)
		bad += memcmp(marker + i, "UMIG-PAGE-MARK!\n", 16) != 0;
	printf("marker: %zu bad\n", bad);

	/* argv and executable as the kernel reports them */
	{
		char buf[8192];
		int fd = open("/proc/self/cmdline", O_RDONLY);
		ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf) : -1;
		size_t off = 0;
		int ok = n > 0;
		for (int i = 0; ok && i < argc; i++) {
			size_t l = strlen(argv[i]) + 1;
			ok = off + l <= (size_t)n && memcmp(buf + off, argv[i], l) == 0;
			off += l;
		}
		printf("cmdline: %s\n", ok && off == (size_t)n ? "same" : "DIFFERENT");
		close(fd);
		ssize_t l2 = readlink("/proc/self/exe", exe2, sizeof exe2 - 1);
		exe2[l2 < 0 ? 0 : l2] = 0;
		printf("exe: %s\n", strcmp(exe, exe2) == 0 ? "same" : "DIFFERENT");
	}

	/* protections */
	struct sigaction sa = {0};
	sa.sa_handler = on_segv;
	sigaction(SIGSEGV, &sa, NULL);
	printf("write ro file mapping: %s\n", probe(ro + 5, 1));
	printf("write read-only anon: %s\n", probe(anon + anon_len - 100, 1));
	printf("read PROT_NONE: %s\n", probe(none + 7, 0));
	printf("write anon: %s\n", probe(anon + 7, 1));
	printf("write cow: %s\n", probe(cow + PAGE + 3, 1));
	printf("write shared: %s\n", probe(shared + 11, 1));
	sa.sa_handler = SIG_DFL;
	sigaction(SIGSEGV, &sa, NULL);

	/* the cow file itself was never written */
	{
		uint8_t *buf = malloc(cow_len);
		int fd = open(cow_path, O_RDONLY);
		ssize_t n = pread(fd, buf, cow_len, 0);
		printf("cow file: %s\n", n == (ssize_t)cow_len && verify(buf, cow_len, 4000) == 0 ? "untouched" : "CHANGED");
		close(fd);
		free(buf);
	}

	/* MAP_SHARED really is shared, MAP_PRIVATE really is private */
	{
		uint8_t a0 = anon[0], c0 = cow[0];
		pid_t child = fork();
		if (child == 0) {
			memset(shared, 0xAB, PAGE);
			anon[0] ^= 0xff;
			cow[0] ^= 0xff;
			_exit(0);
		}
		int st;
		waitpid(child, &st, 0);
		printf("fork: child %s, shared %s, anon %s, cow %s\n", WIFEXITED(st) && !WEXITSTATUS(st) ? "ok" : "FAILED",
		       shared[0] == 0xAB && shared[PAGE - 1] == 0xAB ? "shared" : "NOT SHARED",
		       anon[0] == a0 ? "private" : "NOT PRIVATE", cow[0] == c0 ? "private" : "NOT PRIVATE");
		fill(shared, PAGE, 3000);
	}

	/* brk still moves from where it was */
	{
		char *b0 = sbrk(0);
		char *b1 = sbrk(4 << 20);
		int ok = b1 == b0 && (char *)sbrk(0) == b0 + (4 << 20);
		if (ok)
			memset(b0, 0x5a, 4 << 20);
		ok = ok && sbrk(-(4 << 20)) != (void *)-1 && sbrk(0) == b0;
		printf("brk: %s\n", ok ? "ok" : "FAILED");
		void *more[500];
		for (int i = 0; i < 500; i++) {
			more[i] = malloc(100 + i * 37);
			memset(more[i], i, 100 + i * 37);
		}
		for (int i = 0; i < 500; i++)
			free(more[i]);
		printf("malloc after: ok\n");
	}

	/* rewrite everything writable, verify again */
	if (mprotect(anon + anon_len - (1 << 20), 1 << 20, PROT_READ | PROT_WRITE))
		die("mprotect rw");
	for (int i = 0; i < NBLOCKS + NBIG; i++)
		if (blocks[i].live)
			fill(blocks[i].p, blocks[i].n, 100000 + i);
	fill(anon, anon_len, 200000);
	fill(shared, shared_len, 300000);
	fill(cow, cow_len, 400000);
	fill(sparse + PAGE, PAGE, 300001);
	bad = 0;
	h = FNV0;
	for (int i = 0; i < NBLOCKS + NBIG; i++)
		if (blocks[i].live) {
			bad += verify(blocks[i].p, blocks[i].n, 100000 + i);
			h = fnv(blocks[i].p, blocks[i].n, h);
		}
	bad += verify(anon, anon_len, 200000) + verify(shared, shared_len, 300000) + verify(cow, cow_len, 400000) +
	       verify(sparse + PAGE, PAGE, 300001);
	h = fnv(anon, anon_len, h);
	h = fnv(shared, shared_len, h);
	h = fnv(cow, cow_len, h);
	printf("rewritten: %zu bad bytes, checksum %016llx\n", bad, (unsigned long long)h);
	printf("done\n");
	return 0;
}
