/*
 * ticker: a periodic interval timer (ITIMER_REAL, every 2 ms) whose SIGALRM handler counts ticks,
 * moved while it ticks. A freeze of more than 2 ms leaves a SIGALRM pending and the timer
 * waiting for it to be taken before it re-arms itself: the move must leave it ticking.
 *
 *   ticker TRIGGER DIR
 *
 * Phase 2 (after TRIGGER) counts the ticks of a quarter of a second: about 125, at least 25 asked.
 */
#include <signal.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t ticks;

static void tick(int sig)
{
	(void)sig;
	ticks++;
}

int main(int argc, char **argv)
{
	struct itimerval every = {{0, 2000}, {0, 2000}};
	struct timespec pause = {0, 10 * 1000 * 1000};

	if (argc < 3)
		return 2;
	signal(SIGALRM, tick);
	if (setitimer(ITIMER_REAL, &every, NULL) != 0)
		return 2;
	printf("ready\n");
	fflush(stdout);
	while (access(argv[1], F_OK) != 0)
		nanosleep(&pause, NULL);
	struct timespec now, end;
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_nsec += 250 * 1000 * 1000;
	if (end.tv_nsec >= 1000 * 1000 * 1000) {
		end.tv_sec++;
		end.tv_nsec -= 1000 * 1000 * 1000;
	}
	int before = ticks;
	do {
		nanosleep(&pause, NULL);  /* cut short by each tick */
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (now.tv_sec < end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec < end.tv_nsec));
	int counted = ticks - before;
	printf("timer %s\ndone\n", counted >= 25 ? "still ticking" : "STOPPED");
	return 0;
}
