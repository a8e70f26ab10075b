/*
 * big: a large resident anonymous mapping, every page written with a pattern.
 *
 *   big TRIGGER DIR MIB
 *
 * Phase 2 checks every page and prints a checksum of the page tags. On SIGUSR1 it opens a pipe
 * and keeps it: a descriptor umig does not move, opened while a live move copies its memory.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static void open_a_pipe(int sig)
{
	int fds[2];
	(void)sig;
	if (pipe(fds) != 0)
		_exit(3);
}

static uint64_t tag(size_t pg)
{
	uint64_t x = pg * 0x9E3779B97F4A7C15ULL + 77;
	x ^= x >> 31;
	return x * 0xbf58476d1ce4e5b9ULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: big TRIGGER DIR MIB\n");
		return 2;
	}
	signal(SIGUSR1, open_a_pipe);
	size_t len = strtoul(argv[3], NULL, 0) << 20;
	uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	size_t pages = len / PAGE;
	for (size_t pg = 0; pg < pages; pg++) {
		uint64_t t = tag(pg);
		memset(p + pg * PAGE, (int)(t & 0xff), PAGE);
		memcpy(p + pg * PAGE, &t, 8);
		memcpy(p + pg * PAGE + PAGE - 8, &t, 8);
	}
	printf("%zu pages written\n", pages);
	printf("ready\n");
	fflush(stdout);
	wait_trigger(argv[1]);

	size_t bad = 0;
	uint64_t sum = 0;
	for (size_t pg = 0; pg < pages; pg++) {
		uint64_t t = tag(pg), a, b;
		uint8_t *q = p + pg * PAGE;
		memcpy(&a, q, 8);
		memcpy(&b, q + PAGE - 8, 8);
		bad += a != t || b != t || q[8] != (uint8_t)t || q[PAGE / 2] != (uint8_t)t || q[PAGE - 9] != (uint8_t)t;
		sum += a ^ (sum << 1);
	}
	printf("bad pages %zu checksum %016llx\n", bad, (unsigned long long)sum);
	printf("done\n");
	return 0;
}
