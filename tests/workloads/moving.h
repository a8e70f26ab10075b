/* For workloads that act in the middle of their own move (execer, forker). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

/* Whether umig's write tracker is in this process: between the two freezes of a live or lazy
   move, a userfaultfd at the highest descriptor number the process may use, out of the way of
   its own. Looked at with readlink, not a directory listing: a descriptor held open at a freeze
   would be part of what moves. */
static int holds_umigs_write_tracker(void)
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

/* `mib` MiB of private anonymous memory, each page holding its own byte value from `pattern` on
   (NULL if it cannot be had). */
static unsigned char *patterned_memory(const char *mib, unsigned char pattern, size_t *size)
{
	*size = (size_t)atoi(mib) << 20;
	unsigned char *memory = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!*size || memory == MAP_FAILED)
		return NULL;
	for (size_t i = 0; i < *size; i++)
		memory[i] = (unsigned char)(pattern + i / 4096);
	return memory;
}

static unsigned long memory_sum(const unsigned char *memory, size_t size)
{
	unsigned long total = 0;
	for (size_t i = 0; i < size; i++)
		total += memory[i];
	return total;
}
