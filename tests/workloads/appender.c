/*
 * Appends a numbered line to DIR/appended.log about every millisecond, so that the file it has
 * open grows while a live or lazy migration prepares. After the trigger it reads the file back:
 * every line must be there once, in order. Args: TRIGGER DIR.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char path[4096];
	struct stat st;
	unsigned long written = 0;

	if (argc < 3)
		return 1;
	snprintf(path, sizeof path, "%s/appended.log", argv[2]);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	if (fd < 0)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		struct timespec pause = {0, 1000000};
		dprintf(fd, "%lu\n", ++written);
		nanosleep(&pause, NULL);
	}
	FILE *log = fopen(path, "r");
	unsigned long line, expected = 0;
	while (log && fscanf(log, "%lu", &line) == 1)
		if (line != ++expected)
			break;
	printf("appended lines: %s\ndone\n", log && expected == written && line == written ? "all, in order" : "MISSING OR OUT OF ORDER");
	return 0;
}
