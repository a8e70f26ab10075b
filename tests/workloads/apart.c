/*
 * Two anonymous mappings side by side that the kernel keeps apart (the upper one was moved
 * there by mremap, so its page offset does not continue the lower one's): the restored layout
 * must keep them apart too, with their contents. Args: TRIGGER DIR.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HALF (4 << 20)

static int bad_bytes(const unsigned char *p, size_t n, unsigned char want)
{
	int bad = 0;
	for (size_t i = 0; i < n; i++)
		bad += p[i] != want;
	return bad;
}

int main(int argc, char **argv)
{
	struct stat st;
	unsigned char *a = mmap(NULL, 2 * HALF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *b = mmap(NULL, HALF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (argc < 2 || a == MAP_FAILED || b == MAP_FAILED)
		return 1;
	munmap(a + HALF, HALF);
	memset(a, 0x11, HALF);
	memset(b, 0x22, HALF);
	if (mremap(b, HALF, HALF, MREMAP_MAYMOVE | MREMAP_FIXED, a + HALF) != a + HALF)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		struct timespec pause = {0, 10000000};
		nanosleep(&pause, NULL);
	}
	printf("lower: %d bad bytes, upper: %d bad bytes\n", bad_bytes(a, HALF, 0x11), bad_bytes(a + HALF, HALF, 0x22));
	memset(a, 0x33, 2 * HALF);
	printf("rewritten: %d bad bytes\ndone\n", bad_bytes(a, 2 * HALF, 0x33));
	return 0;
}
