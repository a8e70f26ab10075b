/*
 * rseq: the rseq area glibc registered must still be registered after the wait, at the same
 * address with the same length and signature, and the kernel must keep updating it.
 *
 *   rseq TRIGGER DIR
 *
 * Registration is probed with the rseq syscall itself: registering the same area again
 * returns EBUSY exactly when it is registered with that length and signature. Run with
 * GLIBC_TUNABLES=glibc.pthread.rseq=0 the process has no rseq and must still have none.
 * The kernel's updates are checked by pinning the thread to each allowed CPU in turn and
 * comparing the area's cpu_id with the getcpu syscall.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static struct rseq *area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/* "yes" (registered as glibc did it), "no" (nothing registered), or what went wrong */
static const char *probe(void)
{
	unsigned lens[2] = {__rseq_size, 32};
	for (int i = 0; i < 2; i++) {
		if (lens[i] == 0)
			continue;
		long r = syscall(SYS_rseq, area(), lens[i], 0, RSEQ_SIG);
		if (r == 0) {
			/* nothing was registered and we just did it: undo */
			syscall(SYS_rseq, area(), lens[i], RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
			return "no";
		}
		if (errno == EBUSY)
			return "yes";
		if (errno == EPERM)
			return "OTHER SIGNATURE";
	}
	return "OTHER AREA OR LENGTH";
}

static const char *check_cpus(void)
{
	cpu_set_t allowed, one;
	if (sched_getaffinity(0, sizeof allowed, &allowed))
		return "getaffinity failed";
	int tried = 0, bad = 0;
	for (int c = 0; c < CPU_SETSIZE && tried < 4; c++) {
		if (!CPU_ISSET(c, &allowed))
			continue;
		CPU_ZERO(&one);
		CPU_SET(c, &one);
		if (sched_setaffinity(0, sizeof one, &one))
			continue;
		tried++;
		for (int k = 0; k < 100; k++) {
			sched_yield();
			unsigned cpu = ~0u;
			syscall(SYS_getcpu, &cpu, NULL, NULL);
			volatile struct rseq *rs = area();
			if (cpu != (unsigned)c || rs->cpu_id != cpu || rs->cpu_id_start != cpu ||
			    sched_getcpu() != (int)cpu)
				bad++;
		}
	}
	sched_setaffinity(0, sizeof allowed, &allowed);
	if (!tried)
		return "no cpu";
	return bad ? "FAIL" : "OK";
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: rseq TRIGGER DIR\n");
		return 2;
	}
	const char *reg = probe();
	printf("rseq registered: %s\n", reg);
	int has = strcmp(reg, "yes") == 0;
	if (has)
		printf("cpu_id tracks cpu: %s\n", check_cpus());
	printf("ready\n");
	fflush(stdout);
	wait_trigger(argv[1]);

	printf("rseq registered: %s\n", probe());
	if (has) {
		int bad = 0;
		for (int i = 0; i < 1000; i++) {
			volatile struct rseq *rs = area();
			int c = sched_getcpu();
			bad += c < 0 || (int)rs->cpu_id < 0;
		}
		printf("sched_getcpu loop: %s\n", bad ? "FAIL" : "OK");
		printf("cpu_id tracks cpu: %s\n", check_cpus());
	} else {
		volatile struct rseq *rs = area();
		printf("unregistered area cpu_id: %s\n",
		       (int)rs->cpu_id == RSEQ_CPU_ID_UNINITIALIZED || __rseq_size == 0 ? "uninitialized" : "WRITTEN");
	}
	printf("done\n");
	return 0;
}
