/*
 * registers: known values in ymm0-15, r12-r15, rbx, MXCSR and the x87 stack/control word,
 * held across the whole wait. The wait loop is one inline asm block using raw `syscall`
 * instructions (nanosleep, access), which preserve every register but rax, rcx and r11.
 *
 *   registers TRIGGER DIR
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

struct state {
	uint8_t ymm_in[16][32];
	uint8_t ymm_out[16][32];
	uint64_t gp_in[5];
	uint64_t gp_out[5];
	struct timespec ts;
	const char *path;
	uint32_t mxcsr_in, mxcsr_out;
	uint16_t fcw_in, fcw_out;
	long double st_out[2];
} __attribute__((aligned(32)));

static struct state s;

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: registers TRIGGER DIR\n");
		return 2;
	}
	if (!__builtin_cpu_supports("avx2")) {
		printf("no avx2\n");
		return 3;
	}
	for (int r = 0; r < 16; r++)
		for (int b = 0; b < 32; b++)
			s.ymm_in[r][b] = (uint8_t)(r * 37 + b * 11 + 0x5a + (b >= 16 ? 0x80 : 0));
	for (int i = 0; i < 5; i++)
		s.gp_in[i] = 0x1122334455667788ULL * (i + 1) ^ 0xA5A5A5A5A5A5A5A5ULL;
	s.ts.tv_sec = 0;
	s.ts.tv_nsec = 10 * 1000 * 1000;
	s.path = argv[1];
	s.mxcsr_in = 0x1f80 | (3 << 13); /* all exceptions masked, round toward zero */
	s.fcw_in = 0x0f7f;                /* extended precision, round toward zero */

	printf("loaded %d vector registers\n", 16);
	printf("ready\n");
	fflush(stdout);

	__asm__ volatile(
		"vmovdqu 0*32+%c[yi](%[s]), %%ymm0\n\t"
		"vmovdqu 1*32+%c[yi](%[s]), %%ymm1\n\t"
		"vmovdqu 2*32+%c[yi](%[s]), %%ymm2\n\t"
		"vmovdqu 3*32+%c[yi](%[s]), %%ymm3\n\t"
		"vmovdqu 4*32+%c[yi](%[s]), %%ymm4\n\t"
		"vmovdqu 5*32+%c[yi](%[s]), %%ymm5\n\t"
		"vmovdqu 6*32+%c[yi](%[s]), %%ymm6\n\t"
		"vmovdqu 7*32+%c[yi](%[s]), %%ymm7\n\t"
		"vmovdqu 8*32+%c[yi](%[s]), %%ymm8\n\t"
		"vmovdqu 9*32+%c[yi](%[s]), %%ymm9\n\t"
		"vmovdqu 10*32+%c[yi](%[s]), %%ymm10\n\t"
		"vmovdqu 11*32+%c[yi](%[s]), %%ymm11\n\t"
		"vmovdqu 12*32+%c[yi](%[s]), %%ymm12\n\t"
		"vmovdqu 13*32+%c[yi](%[s]), %%ymm13\n\t"
		"vmovdqu 14*32+%c[yi](%[s]), %%ymm14\n\t"
		"vmovdqu 15*32+%c[yi](%[s]), %%ymm15\n\t"
		"mov 0+%c[gi](%[s]), %%r12\n\t"
		"mov 8+%c[gi](%[s]), %%r13\n\t"
		"mov 16+%c[gi](%[s]), %%r14\n\t"
		"mov 24+%c[gi](%[s]), %%r15\n\t"
		"mov 32+%c[gi](%[s]), %%rbx\n\t"
		"ldmxcsr %c[mi](%[s])\n\t"
		"fninit\n\t"
		"fldcw %c[ci](%[s])\n\t"
		"fldpi\n\t"
		"fld1\n\t"
		"fld1\n\t"
		"faddp\n\t"
		"fldpi\n\t"
		"fdivrp\n\t" /* st0 = 2/pi, rounded toward zero, st1 = pi */
		"1:\n\t"
		"mov $35, %%eax\n\t" /* nanosleep(&ts, NULL) */
		"lea %c[ts](%[s]), %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"mov $21, %%eax\n\t" /* access(path, F_OK) */
		"mov %c[pa](%[s]), %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"test %%rax, %%rax\n\t"
		"jnz 1b\n\t"
		"vmovdqu %%ymm0, 0*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm1, 1*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm2, 2*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm3, 3*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm4, 4*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm5, 5*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm6, 6*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm7, 7*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm8, 8*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm9, 9*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm10, 10*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm11, 11*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm12, 12*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm13, 13*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm14, 14*32+%c[yo](%[s])\n\t"
		"vmovdqu %%ymm15, 15*32+%c[yo](%[s])\n\t"
		"mov %%r12, 0+%c[go](%[s])\n\t"
		"mov %%r13, 8+%c[go](%[s])\n\t"
		"mov %%r14, 16+%c[go](%[s])\n\t"
		"mov %%r15, 24+%c[go](%[s])\n\t"
		"mov %%rbx, 32+%c[go](%[s])\n\t"
		"stmxcsr %c[mo](%[s])\n\t"
		"fnstcw %c[co](%[s])\n\t"
		"fstpt %c[so](%[s])\n\t"
		"fstpt 16+%c[so](%[s])\n\t"
		"fninit\n\t"
		"vzeroupper\n\t"
		:
		: [s] "r"(&s), [yi] "i"(offsetof(struct state, ymm_in)), [yo] "i"(offsetof(struct state, ymm_out)),
		  [gi] "i"(offsetof(struct state, gp_in)), [go] "i"(offsetof(struct state, gp_out)),
		  [ts] "i"(offsetof(struct state, ts)), [pa] "i"(offsetof(struct state, path)),
		  [mi] "i"(offsetof(struct state, mxcsr_in)), [mo] "i"(offsetof(struct state, mxcsr_out)),
		  [ci] "i"(offsetof(struct state, fcw_in)), [co] "i"(offsetof(struct state, fcw_out)),
		  [so] "i"(offsetof(struct state, st_out))
		: "rax", "rcx", "rdi", "rsi", "r11", "r12", "r13", "r14", "r15", "rbx", "xmm0", "xmm1", "xmm2",
		  "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
		  "xmm14", "xmm15", "memory", "cc");

	uint32_t mx_default = 0x1f80;
	__asm__ volatile("ldmxcsr %0" : : "m"(mx_default));

	int bad = 0;
	for (int r = 0; r < 16; r++) {
		printf("ymm%-2d ", r);
		for (int b = 31; b >= 0; b--)
			printf("%02x", s.ymm_out[r][b]);
		printf("\n");
		bad += memcmp(s.ymm_in[r], s.ymm_out[r], 32) != 0;
	}
	const char *names[5] = {"r12", "r13", "r14", "r15", "rbx"};
	for (int i = 0; i < 5; i++) {
		printf("%s %016llx\n", names[i], (unsigned long long)s.gp_out[i]);
		bad += s.gp_in[i] != s.gp_out[i];
	}
	printf("mxcsr %08x\n", s.mxcsr_out);
	printf("fcw %04x\n", s.fcw_out);
	bad += (s.mxcsr_out & ~0x3fu) != s.mxcsr_in; /* low bits: sticky exception flags */
	bad += s.fcw_out != s.fcw_in;
	uint8_t st[2][10];
	memcpy(st[0], &s.st_out[0], 10);
	memcpy(st[1], &s.st_out[1], 10);
	for (int i = 0; i < 2; i++) {
		printf("st%d ", i);
		for (int b = 9; b >= 0; b--)
			printf("%02x", st[i][b]);
		printf("\n");
	}
	/* st1 is pi as fldpi loads it under round-toward-zero (last bit down); st0 = 2/pi */
	static const uint8_t pi[10] = {0x34, 0xc2, 0x68, 0x21, 0xa2, 0xda, 0x0f, 0xc9, 0x00, 0x40};
	bad += memcmp(st[1], pi, 10) != 0;
	printf("registers: %s\n", bad ? "MISMATCH" : "ok");
	printf("done\n");
	return 0;
}
