/*
 * inspect: a process whose state a test can look for in an image.
 *
 *   inspect TRIGGER DIR
 *
 * fd 5: DIR/data.txt opened O_RDWR at offset 123; fd 7: /dev/null. SIGUSR2 has a handler,
 * SIGTERM is ignored, SIGUSR1 is blocked and pending (it has a handler too). A 3 MiB anonymous
 * read/write mapping is filled. During the wait r12-r15 hold known values (raw syscall loop).
 * stderr gets the addresses the test needs ("handler 0x...", "region 0x... SIZE"); stdout gets
 * only deterministic lines.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile int got[65];
static void handler(int sig)
{
	got[sig]++;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: inspect TRIGGER DIR\n");
		return 2;
	}
	char path[4096];
	snprintf(path, sizeof path, "%s/data.txt", argv[2]);
	int fd = open(path, O_RDWR);
	if (fd < 0 || dup2(fd, 5) != 5) {
		perror(path);
		return 2;
	}
	close(fd);
	lseek(5, 123, SEEK_SET);
	fd = open("/dev/null", O_WRONLY);
	dup2(fd, 7);
	close(fd);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = handler;
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGTERM, SIG_IGN);
	sigset_t b;
	sigemptyset(&b);
	sigaddset(&b, SIGUSR1);
	sigprocmask(SIG_BLOCK, &b, NULL);
	kill(getpid(), SIGUSR1);

	size_t len = 3UL << 20;
	uint8_t *region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t i = 0; i < len; i++)
		region[i] = (uint8_t)(i * 7 + i / 4096);

	fprintf(stderr, "handler %#lx\n", (unsigned long)(uintptr_t)handler);
	fprintf(stderr, "region %#lx %zu\n", (unsigned long)(uintptr_t)region, len);
	fflush(stderr);
	printf("ready\n");
	fflush(stdout);

	static const uint64_t in[4] = {0x1111222233334444ULL, 0x5555666677778888ULL, 0x99990000aaaabbbbULL,
				       0xccccddddeeeeffffULL};
	static uint64_t out[4];
	struct timespec ts = {0, 10 * 1000 * 1000};
	__asm__ volatile("mov 0(%[in]), %%r12\n\t"
			 "mov 8(%[in]), %%r13\n\t"
			 "mov 16(%[in]), %%r14\n\t"
			 "mov 24(%[in]), %%r15\n\t"
			 "1:\n\t"
			 "mov $35, %%eax\n\t"
			 "mov %[ts], %%rdi\n\t"
			 "xor %%esi, %%esi\n\t"
			 "syscall\n\t"
			 "mov $21, %%eax\n\t"
			 "mov %[path], %%rdi\n\t"
			 "xor %%esi, %%esi\n\t"
			 "syscall\n\t"
			 "test %%rax, %%rax\n\t"
			 "jnz 1b\n\t"
			 "mov %%r12, 0(%[out])\n\t"
			 "mov %%r13, 8(%[out])\n\t"
			 "mov %%r14, 16(%[out])\n\t"
			 "mov %%r15, 24(%[out])\n\t"
			 :
			 : [in] "r"(in), [out] "r"(out), [ts] "r"(&ts), [path] "r"(argv[1])
			 : "rax", "rcx", "rdi", "rsi", "r11", "r12", "r13", "r14", "r15", "memory", "cc");

	printf("registers: %s\n", memcmp(in, out, sizeof in) ? "MISMATCH" : "ok");
	size_t bad = 0;
	for (size_t i = 0; i < len; i++)
		bad += region[i] != (uint8_t)(i * 7 + i / 4096);
	printf("region: %zu bad bytes\n", bad);
	char buf[16] = {0};
	long long off = lseek(5, 0, SEEK_CUR);
	ssize_t n = read(5, buf, 5);
	printf("fd 5 offset %lld, reads \"%.5s\"\n", off, n == 5 ? buf : "");
	sigprocmask(SIG_UNBLOCK, &b, NULL);
	raise(SIGUSR2);
	printf("SIGUSR1 handled %d, SIGUSR2 handled %d\n", got[SIGUSR1], got[SIGUSR2]);
	printf("done\n");
	return 0;
}
