/*
 * Keeps replacing one of its mappings while it is copied live: mmap MAP_FIXED over it, with
 * the next generation's contents. After the trigger the region must hold one
 * generation throughout, the newest: a tracker that missed the replacement would leave pages
 * of an older one. Args: TRIGGER DIR.
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#define SIZE (8 << 20)

int main(int argc, char **argv)
{
	struct stat st;
	/* Between two PROT_NONE guard pages: a region replaced next to an anonymous neighbour merges
	   with it or not depending on the moment, and the layout compared before and after the
	   move would depend on it. */
	unsigned char *reserved = mmap(NULL, SIZE + 2 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *region = reserved + 4096;
	unsigned generation = 1;
	int bad = 0;

	if (argc < 2 || reserved == MAP_FAILED ||
	    mmap(region, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != region)
		return 1;
	memset(region, generation, SIZE);
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		struct timespec pause = {0, 2000000};
		nanosleep(&pause, NULL);
		/* MAP_FIXED replaces the old mapping in one step: /proc never shows the gap */
		if (mmap(region, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != region)
			return 1;
		generation = generation % 250 + 1;
		memset(region, generation, SIZE);
	}
	for (int i = 0; i < SIZE; i++)
		bad += region[i] != (unsigned char)generation;
	printf("remapped region: %s\ndone\n", bad ? "MIXED GENERATIONS" : "one generation");
	return 0;
}
