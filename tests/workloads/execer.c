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
#include <sys/stat.h>
#include <time.h>

#include "moving.h"

int main(int argc, char **argv)
{
	struct stat st;
	struct timespec nap = {0, 100000};
	int second = argc > 5;
	size_t size;
	unsigned char *memory = argc > 4 ? patterned_memory(argv[4], second ? 0x5a : 0x11, &size) : NULL;
	int tracked = 0;

	if (!memory)
		return 1;
	unsigned long sum = memory_sum(memory, size);
	printf("%s program: sum %lu\n", second ? "second" : "first", sum);
	fflush(stdout);
	if (second) {
		struct timespec now;
		/* clock_gettime goes through the vDSO, which the new program has at a place of its own */
		while (clock_gettime(CLOCK_MONOTONIC, &now) == 0 && stat(argv[1], &st) != 0)
			nanosleep(&nap, NULL);
		printf("second program after the trigger: %s\ndone\n",
		       memory_sum(memory, size) == sum ? "same sum" : "SUM CHANGED");
		return 0;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (stat(argv[1], &st) == 0)
			break;
		int now = holds_umigs_write_tracker();
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
