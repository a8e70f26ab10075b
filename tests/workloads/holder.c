/*
 * holder: a process holding something umig must refuse to move.
 *
 *   holder TRIGGER DIR KIND
 *
 * KIND: pipe (read end fd 5, write end fd 6), socket (a listening TCP socket on 127.0.0.1, fd 5),
 * eventfd (fd 5), epoll (fd 5), pty (a pseudo-terminal master, fd 5), thread (a second thread),
 * child (a child process). Phase 2 checks the object still works and prints the result.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

static void to(int fd, int want)
{
	if (fd < 0) {
		perror("holder");
		exit(2);
	}
	if (fd != want) {
		dup2(fd, want);
		close(fd);
	}
}

static volatile int thread_stop, thread_ticks;
static void *spin(void *arg)
{
	(void)arg;
	struct timespec ts = {0, 5 * 1000 * 1000};
	while (!thread_stop) {
		thread_ticks++;
		nanosleep(&ts, NULL);
	}
	return (void *)42;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: holder TRIGGER DIR KIND\n");
		return 2;
	}
	const char *kind = argv[3];
	pthread_t th;
	pid_t child = -1;
	int p[2];
	if (!strcmp(kind, "pipe")) {
		if (pipe(p))
			return 2;
		int r = dup(p[0]), w = dup(p[1]);
		close(p[0]);
		close(p[1]);
		to(r, 5);
		to(w, 6);
	} else if (!strcmp(kind, "socket")) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
		if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4))
			return 2;
		to(s, 5);
	} else if (!strcmp(kind, "eventfd")) {
		to(eventfd(3, 0), 5);
	} else if (!strcmp(kind, "epoll")) {
		to(epoll_create1(0), 5);
	} else if (!strcmp(kind, "pty")) {
		to(open("/dev/ptmx", O_RDWR | O_NOCTTY), 5);
	} else if (!strcmp(kind, "thread")) {
		pthread_create(&th, NULL, spin, NULL);
	} else if (!strcmp(kind, "child")) {
		child = fork();
		if (child == 0) {
			for (;;)
				pause();
		}
	} else {
		fprintf(stderr, "holder: unknown kind %s\n", kind);
		return 2;
	}
	printf("holding %s\n", kind);
	printf("ready\n");
	fflush(stdout);
	wait_trigger(argv[1]);

	const char *ok = "FAIL";
	if (!strcmp(kind, "pipe")) {
		char c = 0;
		ok = write(6, "x", 1) == 1 && read(5, &c, 1) == 1 && c == 'x' ? "ok" : "FAIL";
	} else if (!strcmp(kind, "socket")) {
		struct sockaddr_in a;
		socklen_t l = sizeof a;
		int c = socket(AF_INET, SOCK_STREAM, 0);
		if (getsockname(5, (struct sockaddr *)&a, &l) == 0 && connect(c, (struct sockaddr *)&a, l) == 0) {
			int s = accept(5, NULL, NULL);
			ok = s >= 0 && write(c, "y", 1) == 1 ? "ok" : "FAIL";
			char b;
			if (s < 0 || read(s, &b, 1) != 1 || b != 'y')
				ok = "FAIL";
		}
	} else if (!strcmp(kind, "eventfd")) {
		uint64_t v = 0;
		ok = read(5, &v, 8) == 8 && v == 3 ? "ok" : "FAIL";
	} else if (!strcmp(kind, "epoll")) {
		struct epoll_event ev = {.events = EPOLLIN};
		int e[2];
		pipe(e);
		epoll_ctl(5, EPOLL_CTL_ADD, e[0], &ev);
		write(e[1], "z", 1);
		ok = epoll_wait(5, &ev, 1, 1000) == 1 ? "ok" : "FAIL";
	} else if (!strcmp(kind, "pty")) {
		ok = grantpt(5) == 0 && unlockpt(5) == 0 && ptsname(5) ? "ok" : "FAIL";
	} else if (!strcmp(kind, "thread")) {
		int before = thread_ticks;
		struct timespec ts = {0, 50 * 1000 * 1000};
		nanosleep(&ts, NULL);
		thread_stop = 1;
		void *ret;
		ok = pthread_join(th, &ret) == 0 && ret == (void *)42 && thread_ticks > before ? "ok" : "FAIL";
	} else if (!strcmp(kind, "child")) {
		int st;
		ok = kill(child, SIGTERM) == 0 && waitpid(child, &st, 0) == child && WIFSIGNALED(st) ? "ok" : "FAIL";
	}
	printf("%s still works: %s\n", kind, ok);
	printf("done\n");
	return 0;
}
