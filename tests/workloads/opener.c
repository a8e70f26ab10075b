/*
 * Opens /dev/null again and again while it is moved, keeping every descriptor: the final state
 * has descriptors the first one had not, numbered where the restorer may have parked its
 * channel. After the trigger it checks that each one it opened is still open on /dev/null.
 * Args: TRIGGER DIR.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 400

int main(int argc, char **argv)
{
	struct stat st, null;
	int fds[MAX_FDS], n = 0, bad = 0;

	if (argc < 2 || stat("/dev/null", &null) != 0)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		struct timespec pause = {0, 500000};
		nanosleep(&pause, NULL);
		if (n < MAX_FDS && (fds[n] = open("/dev/null", O_RDONLY)) >= 0)
			n++;
	}
	for (int i = 0; i < n; i++)
		bad += fstat(fds[i], &st) != 0 || st.st_rdev != null.st_rdev;
	printf("descriptors: %s\ndone\n", bad ? "LOST" : "all open");
	return 0;
}
