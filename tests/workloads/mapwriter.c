/*
 * Maps DIR/mapped.bin shared and stores a counter in it about every millisecond, writing it back
 * each time (msync), as databases do: the file, its mtime with it, changes while a live or lazy
 * migration prepares. After the trigger it reads the file back with read(): it must hold the
 * last counter stored. Args: TRIGGER DIR.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char path[4096];
	struct stat st;
	unsigned long counter = 0, back = 0;

	if (argc < 3)
		return 1;
	snprintf(path, sizeof path, "%s/mapped.bin", argv[2]);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || ftruncate(fd, 4096) != 0)
		return 1;
	unsigned long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (shared == MAP_FAILED)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (stat(argv[1], &st) != 0) {
		struct timespec pause = {0, 1000000};
		*shared = ++counter;
		if (msync(shared, 4096, MS_SYNC) != 0)
			return 1;
		nanosleep(&pause, NULL);
	}
	if (pread(fd, &back, sizeof back, 0) != sizeof back)
		return 1;
	printf("mapped counter: %s\ndone\n", back == counter && counter ? "the last one stored" : "STALE");
	return 0;
}
