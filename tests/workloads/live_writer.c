/*
 * Writes memory hard while being migrated live: each step picks a page with a fixed
 * pseudo-random sequence (nine steps in ten within a hot sixteenth of the region, as real
 * working sets go) and stamps it with the step number, or, one step in 64, drops it. When the trigger file
 * appears it prints how many steps it took and a hash of the whole region.
 *   live_writer TRIGGER MIB          run until TRIGGER exists, then report
 *   live_writer --replay STEPS MIB   take exactly STEPS steps and report: what a process that
 *                                    lost no write during its migration must have reported
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t next(uint64_t *state)
{
	*state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
	return *state >> 17;
}

static void step(unsigned char *region, size_t pages, uint64_t *rng, uint64_t n)
{
	uint64_t pick = next(rng);
	uint64_t *page = (uint64_t *)(region + (pick % 10 ? (pick >> 4) % (pages / 16) : (pick >> 4) % pages) * PAGE);

	if (n % 64 == 0) {
		/* dropped: it reads as zeros from now on, wherever the process lives by then */
		madvise(page, PAGE, MADV_DONTNEED);
		return;
	}
	for (size_t i = 0; i < PAGE / sizeof(uint64_t); i += 8)
		page[i] = n * 0x9E3779B97F4A7C15ULL + i;
}

static uint64_t hash(const unsigned char *region, size_t size)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < size; i += 8) {
		h ^= *(const uint64_t *)(region + i);
		h *= 0x100000001b3ULL;
	}
	return h;
}

int main(int argc, char **argv)
{
	int replay = argc == 4 && strcmp(argv[1], "--replay") == 0;
	size_t size = (size_t)atol(argv[argc - 1]) << 20, pages = size / PAGE;
	unsigned char *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t rng = 42, n = 0, steps = replay ? strtoull(argv[2], NULL, 10) : 0;

	if (region == MAP_FAILED)
		return 1;
	memset(region, 0x5a, size);
	if (replay) {
		for (n = 1; n <= steps; n++)
			step(region, pages, &rng, n);
		printf("steps %llu hash %016llx\n", (unsigned long long)steps, (unsigned long long)hash(region, size));
		return 0;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		step(region, pages, &rng, ++n);
		if (n % 256 == 0) {
			/* about 250 000 pages a second: faster than any round can copy the whole region */
			struct timespec pause = {0, 1000000};
			nanosleep(&pause, NULL);
			if (n % 4096 == 0 && access(argv[1], F_OK) == 0)
				break;
		}
	}
	printf("steps %llu hash %016llx\n", (unsigned long long)n, (unsigned long long)hash(region, size));
	return 0;
}
