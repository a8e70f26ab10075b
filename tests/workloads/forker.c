/*
 * Forks as soon as it runs on the target of a lazy move (umig's write tracker, a userfaultfd at
 * the highest descriptor number it may use, came at the first freeze and has gone again), while
 * its memory is still arriving: the children's copies of the pages still missing must arrive
 * too, not read as zeros. A run never moved forks at the trigger instead. Its MIB MiB hold a
 * pattern; MODE says what the family does with it:
 *   waits   a child forks a grandchild; each sums the memory, the grandchild first (then it
 *           waits for the trigger), the parent last, each after waiting for its child;
 *   leaves  the parent ends at once; its child, after the trigger, sums the memory into
 *           DIR/child.txt;
 *   staggered  eight children, forked over 90 ms (some while a record of pages is being placed),
 *           sum it after the trigger; the parent counts those that found it wrong.
 * Args: TRIGGER DIR MIB MODE.
 */
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "moving.h"

static void say(const char *who, unsigned long total)
{
	printf("%s sum %lu\n", who, total);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct stat st;
	struct timespec nap = {0, 100000};
	size_t size;
	unsigned char *memory = argc > 4 ? patterned_memory(argv[3], 0x21, &size) : NULL;
	int tracked = 0;

	if (!memory)
		return 1;
	unsigned long expected = memory_sum(memory, size);
	say("first", expected);
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		int now = holds_umigs_write_tracker();
		if (tracked && !now)
			break;
		tracked |= now;
		nanosleep(&nap, NULL);
	}
	if (strcmp(argv[4], "leaves") == 0) {
		pid_t child = fork();
		if (child < 0)
			return 1;
		if (child == 0) {
			char path[4096], temporary[4200];
			snprintf(path, sizeof(path), "%s/child.txt", argv[2]);
			snprintf(temporary, sizeof(temporary), "%s.part", path);
			while (stat(argv[1], &st) != 0)
				nanosleep(&nap, NULL);
			FILE *out = fopen(temporary, "w");
			if (!out)
				_exit(1);
			fprintf(out, "child sum %lu\n", memory_sum(memory, size));
			fclose(out);
			_exit(rename(temporary, path) != 0);
		}
		printf("parent leaves\ndone\n");
		return 0;
	}
	if (strcmp(argv[4], "staggered") == 0) {
		static const long delays_ms[8] = {0, 5, 10, 20, 30, 45, 60, 90};
		pid_t children[8];
		int wrong = 0;
		for (int i = 0; i < 8; i++) {
			struct timespec delay = {0, (delays_ms[i] - (i ? delays_ms[i - 1] : 0)) * 1000000L};
			nanosleep(&delay, NULL);
			children[i] = fork();
			if (children[i] < 0)
				return 1;
			if (children[i] == 0) {
				while (stat(argv[1], &st) != 0)
					nanosleep(&nap, NULL);
				_exit(memory_sum(memory, size) != expected);
			}
		}
		for (int i = 0; i < 8; i++) {
			int status;
			waitpid(children[i], &status, 0);
			wrong += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
		}
		printf("children whose memory was wrong: %d\ndone\n", wrong);
		return 0;
	}
	pid_t child = fork();
	if (child < 0)
		return 1;
	if (child == 0) {
		pid_t grandchild = fork();
		if (grandchild < 0)
			_exit(1);
		if (grandchild == 0) {
			say("grandchild", memory_sum(memory, size));
			while (stat(argv[1], &st) != 0)
				nanosleep(&nap, NULL);
			_exit(0);
		}
		waitpid(grandchild, NULL, 0);
		say("child", memory_sum(memory, size));
		_exit(0);
	}
	waitpid(child, NULL, 0);
	say("parent", memory_sum(memory, size));
	printf("done\n");
	return 0;
}
