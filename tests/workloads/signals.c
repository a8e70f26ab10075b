/*
 * signals: handlers, masks, pending signals and the alternate signal stack across the wait.
 *
 *   signals TRIGGER DIR
 *
 * Phase 1: handlers for SIGUSR2 (SA_SIGINFO|SA_RESTART, sa_mask {SIGHUP, SIGTERM}), SIGUSR1,
 * SIGRTMIN+2, SIGRTMIN+3, SIGWINCH (SA_ONSTACK) and SIGINT (SA_RESETHAND|SA_NODEFER); SIGPIPE
 * ignored; sigaltstack installed; SIGUSR1, SIGRTMIN+2, SIGRTMIN+3 and SIGQUIT blocked; then
 * pending: SIGUSR1 (kill to itself), SIGRTMIN+2 twice with values 111 and 222 (sigqueue, process
 * wide), SIGRTMIN+3 with raise() (thread directed).
 * Phase 2 reads all of it back, raises SIGUSR2 and SIGWINCH, unblocks the pending ones and
 * prints what each handler saw.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void wait_trigger(const char *path)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	while (access(path, F_OK) != 0)
		nanosleep(&ts, NULL);
}

struct record {
	int signo, code, value, pid_ok, mask_ok, on_altstack;
};
static struct record log_[32];
static volatile int nlog;
static char altstack[64 * 1024] __attribute__((aligned(16)));
static pid_t mypid;

static void handler(int sig, siginfo_t *si, void *ucv)
{
	(void)ucv;
	char here;
	struct record *r = &log_[nlog < 32 ? nlog : 31];
	r->signo = sig;
	r->code = si->si_code;
	r->value = (si->si_code == SI_QUEUE) ? si->si_value.sival_int : -1;
	r->pid_ok = si->si_pid == (pid_t)syscall(SYS_getpid) && si->si_pid == mypid;
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (sig == SIGUSR2)
		r->mask_ok = sigismember(&cur, SIGUSR2) && sigismember(&cur, SIGHUP) && sigismember(&cur, SIGTERM) &&
			     !sigismember(&cur, SIGINT);
	else if (sig == SIGINT) /* SA_NODEFER */
		r->mask_ok = !sigismember(&cur, sig);
	else
		r->mask_ok = sigismember(&cur, sig);
	r->on_altstack = &here >= altstack && &here < altstack + sizeof altstack;
	stack_t ss;
	sigaltstack(NULL, &ss);
	if (sig == SIGWINCH)
		r->on_altstack = r->on_altstack && (ss.ss_flags & SS_ONSTACK);
	nlog++;
}

static void install(int sig, int flags, const int *mask_sigs)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = handler;
	sa.sa_flags = SA_SIGINFO | flags;
	sigemptyset(&sa.sa_mask);
	for (; mask_sigs && *mask_sigs; mask_sigs++)
		sigaddset(&sa.sa_mask, *mask_sigs);
	if (sigaction(sig, &sa, NULL)) {
		perror("sigaction");
		exit(2);
	}
}

static void print_set(const char *what, const sigset_t *set)
{
	printf("%s:", what);
	for (int s = 1; s < 65; s++)
		if (sigismember(set, s))
			printf(" %d", s);
	printf("\n");
}

#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000
#endif
static void (*restorer1)(void); /* glibc's sa_restorer as phase 1 saw it */

static void describe(int sig)
{
	struct sigaction sa;
	sigaction(sig, NULL, &sa);
	if (!restorer1)
		restorer1 = sa.sa_restorer;
	const char *h = sa.sa_handler == SIG_IGN ? "ignored"
			: sa.sa_handler == SIG_DFL ? "default"
			: sa.sa_sigaction == handler ? "handler"
			: "UNKNOWN";
	printf("sig %d: %s flags %#x restorer %s ", sig, h,
	       sa.sa_flags & (SA_SIGINFO | SA_RESTART | SA_ONSTACK | SA_NODEFER | SA_RESETHAND | SA_NOCLDSTOP),
	       !(sa.sa_flags & SA_RESTORER) ? "none" : sa.sa_restorer == restorer1 ? "same" : "DIFFERENT");
	print_set("mask", &sa.sa_mask);
}

static void print_log(void)
{
	for (int i = 0; i < nlog; i++)
		printf("handled %d code %d value %d pid %s mask %s altstack %s\n", log_[i].signo, log_[i].code,
		       log_[i].value, log_[i].pid_ok ? "ok" : "WRONG", log_[i].mask_ok ? "ok" : "WRONG",
		       log_[i].on_altstack ? "yes" : "no");
	nlog = 0;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: signals TRIGGER DIR\n");
		return 2;
	}
	mypid = getpid();
	int all_test[] = {SIGUSR1, SIGUSR2, SIGWINCH, 0};
	int usr2_mask[] = {SIGHUP, SIGTERM, 0};
	install(SIGUSR2, SA_RESTART, usr2_mask);
	install(SIGUSR1, SA_RESTART, all_test);
	install(SIGRTMIN + 2, 0, all_test);
	install(SIGRTMIN + 3, 0, all_test);
	install(SIGWINCH, SA_ONSTACK, NULL);
	install(SIGINT, SA_RESETHAND | SA_NODEFER, NULL);
	signal(SIGPIPE, SIG_IGN);

	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
	if (sigaltstack(&ss, NULL)) {
		perror("sigaltstack");
		return 2;
	}

	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGRTMIN + 2);
	sigaddset(&block, SIGRTMIN + 3);
	sigaddset(&block, SIGQUIT);
	sigprocmask(SIG_BLOCK, &block, NULL);
	kill(getpid(), SIGUSR1);
	union sigval v;
	v.sival_int = 111;
	sigqueue(getpid(), SIGRTMIN + 2, v);
	v.sival_int = 222;
	sigqueue(getpid(), SIGRTMIN + 2, v);
	raise(SIGRTMIN + 3);

	describe(SIGUSR2);
	sigset_t pend, cur;
	sigpending(&pend);
	print_set("pending", &pend);
	sigprocmask(SIG_BLOCK, NULL, &cur);
	print_set("blocked", &cur);
	printf("ready\n");
	fflush(stdout);
	wait_trigger(argv[1]);

	/* ---- phase 2 ---- */
	printf("pid: %s\n", getpid() == mypid && syscall(SYS_gettid) == mypid ? "kept" : "CHANGED");
	sigpending(&pend);
	print_set("pending", &pend);
	sigprocmask(SIG_BLOCK, NULL, &cur);
	print_set("blocked", &cur);
	int sigs[] = {SIGUSR1, SIGUSR2, SIGINT, SIGPIPE, SIGWINCH, SIGTERM, SIGRTMIN + 2, SIGRTMIN + 3};
	for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
		describe(sigs[i]);
	stack_t now;
	sigaltstack(NULL, &now);
	printf("altstack: %s flags %d\n",
	       now.ss_sp == altstack && now.ss_size == sizeof altstack ? "same" : "DIFFERENT", now.ss_flags);

	printf("raise SIGUSR2: %d\n", raise(SIGUSR2));
	print_log();
	printf("raise SIGWINCH: %d\n", raise(SIGWINCH));
	print_log();
	sigprocmask(SIG_UNBLOCK, &block, NULL);
	print_log();
	sigpending(&pend);
	print_set("pending after unblock", &pend);
	/* SA_RESETHAND: the first SIGINT runs the handler and resets the action */
	printf("raise SIGINT: %d\n", raise(SIGINT));
	print_log();
	describe(SIGINT);
	printf("done\n");
	return 0;
}
