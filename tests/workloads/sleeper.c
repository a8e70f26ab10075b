/*
 * sleeper: migrated while blocked in nanosleep.
 *
 *   sleeper TRIGGER DIR [SECONDS [STATUS]]
 *
 * After `ready` it sleeps SECONDS (default 2) with nanosleep, continuing with the remaining time
 * after EINTR, and checks on CLOCK_MONOTONIC that at least that long passed. Then it waits for
 * TRIGGER and sleeps 0.3 s more until an absolute CLOCK_MONOTONIC deadline, then exits with
 * STATUS (default 0).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: sleeper TRIGGER DIR [SECONDS [STATUS]]\n");
		return 2;
	}
	int secs = argc > 3 ? atoi(argv[3]) : 2;
	int status = argc > 4 ? atoi(argv[4]) : 0;
	printf("sleeping %d s\n", secs);
	printf("ready\n");
	fflush(stdout);

	double t0 = now();
	struct timespec req = {secs, 0}, rem;
	int r;
	while ((r = nanosleep(&req, &rem)) == -1 && errno == EINTR)
		req = rem;
	double slept = now() - t0;
	printf("nanosleep returned %d\n", r);
	printf("slept long enough: %s\n", slept >= secs ? "yes" : "NO");
	fflush(stdout);
	wait_trigger(argv[1]);

	struct timespec deadline;
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	double t1 = deadline.tv_sec + deadline.tv_nsec / 1e9;
	deadline.tv_nsec += 300 * 1000 * 1000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	while ((r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL)) == EINTR)
		;
	printf("clock_nanosleep returned %d, deadline reached: %s\n", r, now() - t1 >= 0.3 ? "yes" : "NO");
	printf("done\n");
	return status;
}
