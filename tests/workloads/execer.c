/*
 * Executes itself again in the middle of its move, at the moment WHEN names:
 *   between  once umig's write tracker is in it (a userfaultfd among its descriptors): it runs
 *            on the source between the two freezes of a live or lazy move;
 *   resumed  once that userfaultfd has gone again: it runs on the target of a lazy move, whose
 *            memory is still arriving;
 *   ends     as resumed, but it ends there instead (status 0);
 *   ends-between  as between, but it ends instead.
 * A run never moved does so at the trigger instead. Each program fills MIB MiB with a
 * pattern of its own and sums it; the second, after the trigger, sums it again.
 * Args: TRIGGER DIR WHEN MIB [second].
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* umig puts its write tracker's userfaultfd at the highest number the process may use, out of
   the way of its own (readlink, not a directory listing: a descriptor held open at the freeze
   would be part of what moves). */
static int holds_a_userfaultfd(void)
{
	struct rlimit limit;
	char path[64], target[64];

	if (getrlimit(RLIMIT_NOFILE, &limit) != 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/self/fd/%llu", (unsigned long long)limit.rlim_cur - 1);
	ssize_t n = readlink(path, target, sizeof(target) - 1);
	if (n <= 0)
		return 0;
	target[n] = 0;
	return strcmp(target, "anon_inode:[userfaultfd]") == 0;
}

static unsigned long fill_and_sum(unsigned char *memory, size_t size, unsigned char pattern)
{
	unsigned long sum = 0;
	for (size_t i = 0; i < size; i++)
		memory[i] = (unsigned char)(pattern + i / 4096);
	for (size_t i = 0; i < size; i++)
		sum += memory[i];
	return sum;
}

int main(int argc, char **argv)
{
	struct stat st;
	struct timespec nap = {0, 100000};
	int second = argc > 5;
	size_t size = argc > 4 ? (size_t)atoi(argv[4]) << 20 : 0;
	unsigned char *memory = size ? mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
				     : MAP_FAILED;
	int tracked = 0;

	if (memory == MAP_FAILED)
		return 1;
	unsigned long sum = fill_and_sum(memory, size, second ? 0x5a : 0x11);
	printf("%s program: sum %lu\n", second ? "second" : "first", sum);
	fflush(stdout);
	if (second) {
		struct timespec now;
		/* clock_gettime goes through the vDSO, which the new program has at a place of its own */
		while (clock_gettime(CLOCK_MONOTONIC, &now) == 0 && stat(argv[1], &st) != 0)
			nanosleep(&nap, NULL);
		unsigned long again = 0;
		for (size_t i = 0; i < size; i++)
			again += memory[i];
		printf("second program after the trigger: %s\ndone\n", again == sum ? "same sum" : "SUM CHANGED");
		return 0;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (stat(argv[1], &st) == 0)
			break;
		int now = holds_a_userfaultfd();
		int between = strstr(argv[3], "between") != NULL;
		if (now && between)
			break;
		if (tracked && !now && !between)
			break;
		tracked |= now;
		nanosleep(&nap, NULL);
	}
	if (strncmp(argv[3], "ends", 4) == 0) {
		printf("ends without executing\ndone\n");
		return 0;
	}
	execl("/proc/self/exe", argv[0], argv[1], argv[2], argv[3], argv[4], "second", (char *)NULL);
	return 1;
}
