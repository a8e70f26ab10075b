/*
 * umig-restorer: the process that turns into the restored image.
 *
 * It must keep running while the agent unmaps everything the kernel loaded for it and maps the
 * image in its place, so it copies itself into a hole of the image's address space first and runs
 * from there. That is why it is freestanding (no libc: nothing may depend on mappings it loses)
 * and why it carries no dynamic relocations at all: the copy runs unrelocated at any address, so
 * every reference to code or data must be RIP-relative. Hence no initialised pointers, no tables
 * of pointers (switch statements instead); the Makefile rejects any build that has a relocation.
 *
 * The wire protocol is described in protocol.h.
 */
#include <asm/signal.h>
#include <asm/unistd.h>
#include <linux/elf.h>
#include <linux/errno.h>
#include <linux/fcntl.h>
#include <linux/fs.h>
#include <linux/mman.h>
#include <linux/prctl.h>
#include <linux/resource.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <linux/wait.h>

#include "protocol.h"

/* Hidden symbols are reached RIP-relatively, never through the GOT (which would need relocating). */
#pragma GCC visibility push(hidden)

extern char __ehdr_start[]; /* the ELF header: the first byte of the loaded image */
extern char _end[];         /* the end of .bss: the last byte of the loaded image */

#define PAGE_SIZE 4096UL

/* ---- raw system calls ---------------------------------------------------------------------- */

static inline long syscall6(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	register long r9 __asm__("r9") = a6;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define syscall0(nr) syscall6(nr, 0, 0, 0, 0, 0, 0)
#define syscall1(nr, a) syscall6(nr, (long)(a), 0, 0, 0, 0, 0)
#define syscall2(nr, a, b) syscall6(nr, (long)(a), (long)(b), 0, 0, 0, 0)
#define syscall3(nr, a, b, c) syscall6(nr, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define syscall4(nr, a, b, c, d) syscall6(nr, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define syscall5(nr, a, b, c, d, e) \
	syscall6(nr, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* The kernel returns -errno in the top 4095 values; anything else (addresses included) is success. */
static inline int failed(long ret)
{
	return (unsigned long)ret > -4096UL;
}

static void __attribute__((noreturn)) exit_group(int status)
{
	for (;;)
		syscall1(__NR_exit_group, status);
}

/* ---- memory helpers -------------------------------------------------------------------------- */

/*
 * The compiler may emit calls to these for struct copies and initialisers even when freestanding.
 * String instructions cannot be turned back into calls to themselves by the optimiser.
 */
void *memcpy(void *dst, const void *src, unsigned long n)
{
	void *ret = dst;

	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
	return ret;
}

void *memset(void *dst, int c, unsigned long n)
{
	void *ret = dst;

	__asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
	return ret;
}

/* ---- state (zero-initialised .bss: copied along with the image by RELOCATE) ------------------ */

static int channel;
static struct umig_range hole;
static u32 payload_size;
/* one spare byte so that a trailing path or name can always be NUL terminated in place */
static unsigned char payload[UMIG_MAX_PAYLOAD + 1] __attribute__((aligned(16)));

/* ---- the channel ----------------------------------------------------------------------------- */

static void send_report(u32 op, long error, u64 detail)
{
	struct umig_report report;
	const char *p = (const char *)&report;
	unsigned long left = sizeof(report);

	report.op = op;
	report.error = (s32)error;
	report.detail = detail;
	while (left) {
		long n = syscall3(__NR_write, channel, p, left);

		if (n == -EINTR)
			continue;
		if (failed(n) || n == 0)
			exit_group(1); /* the agent is gone: nobody left to tell */
		p += n;
		left -= n;
	}
}

static void __attribute__((noreturn)) fail(u32 op, long error, u64 detail)
{
	send_report(op, error, detail);
	exit_group(1);
}

static long check(long ret, u32 op, u64 detail)
{
	if (failed(ret))
		fail(op, ret, detail);
	return ret;
}

/* Reads exactly len bytes of a command. End of file or an error means the agent gave up (or
   broke the channel): leave silently, it knows. */
static void receive(void *dst, u64 len)
{
	char *p = dst;

	while (len) {
		long n = syscall3(__NR_read, channel, p, len);

		if (n == -EINTR)
			continue;
		if (n <= 0)
			exit_group(1);
		p += n;
		len -= n;
	}
}

/* Checks the payload is a `fixed`-byte struct followed by exactly `extra` bytes. */
static void expect_size(u32 op, u64 fixed, u64 extra)
{
	if (payload_size != fixed + extra)
		fail(op, -EINVAL, payload_size);
}

/* ---- steps ----------------------------------------------------------------------------------- */

static void __attribute__((noreturn)) serve(void);

/* The first thing the copy does: runs on the new stack, from the hole. */
static void __attribute__((noreturn, used)) continue_in_copy(void)
{
	send_report(UMIG_OP_RELOCATE, 0, hole.start);
	serve();
}

static void copy_image(u64 dest)
{
	/* A PIE is linked at 0, so a segment's p_vaddr is its offset from the ELF header. */
	const struct elf64_hdr *eh = (const void *)__ehdr_start;
	const struct elf64_phdr *ph = (const void *)(__ehdr_start + eh->e_phoff);

	/* Copy segment by segment: the gaps between them may be unmapped. */
	for (int i = 0; i < eh->e_phnum; i++)
		if (ph[i].p_type == PT_LOAD)
			memcpy((void *)(dest + ph[i].p_vaddr), __ehdr_start + ph[i].p_vaddr,
			       ph[i].p_memsz);
}

static void __attribute__((noreturn)) step_relocate(void)
{
	const struct umig_range *r = (const void *)payload;
	u64 image_pages = ((u64)(_end - __ehdr_start) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
	u64 delta, top;
	long addr;

	expect_size(UMIG_OP_RELOCATE, sizeof(*r), 0);
	if (r->start % PAGE_SIZE || r->length < image_pages + UMIG_RELOCATE_STACK)
		fail(UMIG_OP_RELOCATE, -EINVAL, r->start);
	addr = check(syscall6(__NR_mmap, r->start, r->length, PROT_READ | PROT_WRITE | PROT_EXEC,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0),
		     UMIG_OP_RELOCATE, r->start);
	if ((u64)addr != r->start) /* kernels before 4.17 treat NOREPLACE as a hint */
		fail(UMIG_OP_RELOCATE, -EEXIST, r->start);

	hole = *r; /* before the copy, so the copy knows its own hole */
	copy_image(r->start);

	delta = r->start - (u64)__ehdr_start;
	/* The stack sits right above the image, so the rest of the range stays free for the agent. */
	top = r->start + image_pages + UMIG_RELOCATE_STACK;
	/* `call` leaves the stack as a function entry expects it: 8 bytes below a 16-byte boundary */
	__asm__ volatile("mov %0, %%rsp\n\t"
			 "xor %%ebp, %%ebp\n\t"
			 "call *%1\n\t"
			 "ud2"
			 :
			 : "r"(top), "r"((u64)continue_in_copy + delta)
			 : "memory");
	__builtin_unreachable();
}

static u64 step_close_fds(void)
{
	u32 lowest = *(const u32 *)payload;
	long fd;

	expect_size(UMIG_OP_CLOSE_FDS, sizeof(u32), 0);
	fd = check(syscall3(__NR_fcntl, channel, F_DUPFD, lowest), UMIG_OP_CLOSE_FDS, lowest);
	check(syscall1(__NR_close, channel), UMIG_OP_CLOSE_FDS, channel);
	channel = fd;
	if (fd > 0)
		check(syscall3(__NR_close_range, 0, fd - 1, 0), UMIG_OP_CLOSE_FDS, lowest);
	check(syscall3(__NR_close_range, fd + 1, ~0U, 0), UMIG_OP_CLOSE_FDS, lowest);
	return fd;
}

static u64 step_unmap(void)
{
	const struct umig_range *r = (const void *)payload;

	expect_size(UMIG_OP_UNMAP, sizeof(*r), 0);
	check(syscall2(__NR_munmap, r->start, r->length), UMIG_OP_UNMAP, r->start);
	return r->start;
}

static u64 step_move(void)
{
	const struct umig_move *m = (const void *)payload;
	long addr;

	expect_size(UMIG_OP_MOVE, sizeof(*m), 0);
	addr = check(syscall5(__NR_mremap, m->from, m->length, m->length,
			      MREMAP_MAYMOVE | MREMAP_FIXED, m->to),
		     UMIG_OP_MOVE, m->from);
	if ((u64)addr != m->to)
		fail(UMIG_OP_MOVE, -EFAULT, m->from);
	return m->to;
}

static u64 step_map(void)
{
	const struct umig_map *m = (const void *)payload;
	const char *path = (const char *)(m + 1);
	long fd = -1, addr;

	expect_size(UMIG_OP_MAP, sizeof(*m), payload_size >= sizeof(*m) ? m->path_length : 0);
	if (!(m->flags & MAP_ANONYMOUS))
		fd = check(syscall4(__NR_openat, AT_FDCWD, path, m->open_flags | O_CLOEXEC, 0),
			   UMIG_OP_MAP, m->start);
	addr = syscall6(__NR_mmap, m->start, m->length, m->prot, m->flags | MAP_FIXED_NOREPLACE,
			fd, m->offset);
	if (fd >= 0)
		check(syscall1(__NR_close, fd), UMIG_OP_MAP, m->start);
	check(addr, UMIG_OP_MAP, m->start);
	if ((u64)addr != m->start)
		fail(UMIG_OP_MAP, -EEXIST, m->start);
	return m->start;
}

static u64 step_protect(void)
{
	const struct umig_protect *p = (const void *)payload;

	expect_size(UMIG_OP_PROTECT, sizeof(*p), 0);
	check(syscall3(__NR_mprotect, p->start, p->length, p->prot), UMIG_OP_PROTECT, p->start);
	return p->start;
}

static u64 step_madvise(void)
{
	const struct umig_advice *a = (const void *)payload;

	expect_size(UMIG_OP_MADVISE, sizeof(*a), 0);
	check(syscall3(__NR_madvise, a->start, a->length, a->advice), UMIG_OP_MADVISE, a->start);
	return a->start;
}

static u64 step_mm(void)
{
	const struct umig_mm *mm = (const void *)payload;
	const unsigned char *auxv = (const unsigned char *)(mm + 1);
	struct prctl_mm_map map;
	long fd = -1, ret;

	expect_size(UMIG_OP_MM, sizeof(*mm),
		    payload_size >= sizeof(*mm) ? (u64)mm->auxv_size + mm->path_length : 0);
	if (mm->path_length)
		fd = check(syscall4(__NR_openat, AT_FDCWD, auxv + mm->auxv_size,
				    O_RDONLY | O_CLOEXEC, 0),
			   UMIG_OP_MM, 0);
	map.start_code = mm->start_code;
	map.end_code = mm->end_code;
	map.start_data = mm->start_data;
	map.end_data = mm->end_data;
	map.start_brk = mm->start_brk;
	map.brk = mm->brk;
	map.start_stack = mm->start_stack;
	map.arg_start = mm->arg_start;
	map.arg_end = mm->arg_end;
	map.env_start = mm->env_start;
	map.env_end = mm->env_end;
	map.auxv = (__u64 *)auxv;
	map.auxv_size = mm->auxv_size;
	map.exe_fd = (__u32)fd; /* -1: keep the current exe link */
	ret = syscall5(__NR_prctl, PR_SET_MM, PR_SET_MM_MAP, &map, sizeof(map), 0);
	if (fd >= 0)
		check(syscall1(__NR_close, fd), UMIG_OP_MM, 0);
	check(ret, UMIG_OP_MM, 0);
	return 0;
}

static u64 step_open_fd(void)
{
	const struct umig_open_fd *o = (const void *)payload;
	const char *path = (const char *)(o + 1);
	long fd;

	expect_size(UMIG_OP_OPEN_FD, sizeof(*o), payload_size >= sizeof(*o) ? o->path_length : 0);
	if (o->fd < 0 || o->fd == channel)
		fail(UMIG_OP_OPEN_FD, -EBADF, (u32)o->fd);
	/* O_NOCTTY: reopening a terminal must not make it our controlling terminal */
	fd = check(syscall4(__NR_openat, AT_FDCWD, path,
			    (o->flags & ~(O_CREAT | O_TRUNC | O_EXCL)) | O_NOCTTY, 0),
		   UMIG_OP_OPEN_FD, o->fd);
	if (fd != o->fd) {
		check(syscall3(__NR_dup3, fd, o->fd, o->flags & O_CLOEXEC), UMIG_OP_OPEN_FD, o->fd);
		check(syscall1(__NR_close, fd), UMIG_OP_OPEN_FD, o->fd);
	}
	if (o->seek)
		check(syscall3(__NR_lseek, o->fd, o->offset, SEEK_SET), UMIG_OP_OPEN_FD, o->fd);
	return o->fd;
}

static u64 step_dup(void)
{
	const struct umig_dup *d = (const void *)payload;

	expect_size(UMIG_OP_DUP, sizeof(*d), 0);
	if (d->to < 0 || d->to == channel || d->from == channel)
		fail(UMIG_OP_DUP, -EBADF, (u32)d->to);
	check(syscall3(__NR_dup3, d->from, d->to, d->cloexec ? O_CLOEXEC : 0), UMIG_OP_DUP, d->to);
	return d->to;
}

static u64 step_itimer(void)
{
	const struct umig_itimer *t = (const void *)payload;

	expect_size(UMIG_OP_ITIMER, sizeof(*t), 0);
	check(syscall3(__NR_setitimer, t->which, &t->interval_sec, 0), UMIG_OP_ITIMER, t->which);
	return t->which;
}

/* A userfaultfd for the agent, which takes it (pidfd_getfd), registers the ranges itself, fills
   them (UFFDIO_COPY) and, in post-copy, serves the process's faults on their missing pages. */
static u64 step_userfaultfd(void)
{
	struct uffdio_api api = { .api = UFFD_API };
	long fd;

	expect_size(UMIG_OP_USERFAULTFD, sizeof(u64), 0);
	api.features = *(const u64 *)payload;
	fd = check(syscall1(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK), UMIG_OP_USERFAULTFD, 0);
	check(syscall3(__NR_ioctl, fd, UFFDIO_API, &api), UMIG_OP_USERFAULTFD, 0);
	return fd;
}

static u64 step_close(void)
{
	const s32 *fd = (const void *)payload;

	expect_size(UMIG_OP_CLOSE, sizeof(*fd), 0);
	check(syscall1(__NR_close, *fd), UMIG_OP_CLOSE, (u32)*fd);
	return *fd;
}

static u64 step_chdir(void)
{
	check(syscall1(__NR_chdir, payload), UMIG_OP_CHDIR, 0);
	return 0;
}

static u64 step_umask(void)
{
	expect_size(UMIG_OP_UMASK, sizeof(u32), 0);
	syscall1(__NR_umask, *(const u32 *)payload); /* cannot fail: returns the old mask */
	return 0;
}

static u64 step_rlimit(void)
{
	const struct umig_rlimit *r = (const void *)payload;
	struct rlimit64 limit;

	expect_size(UMIG_OP_RLIMIT, sizeof(*r), 0);
	limit.rlim_cur = r->cur;
	limit.rlim_max = r->max;
	check(syscall4(__NR_prlimit64, 0, r->resource, &limit, 0), UMIG_OP_RLIMIT, r->resource);
	return r->resource;
}

static u64 step_personality(void)
{
	expect_size(UMIG_OP_PERSONALITY, sizeof(u64), 0);
	check(syscall1(__NR_personality, *(const u64 *)payload), UMIG_OP_PERSONALITY, 0);
	return 0;
}

static u64 step_comm(void)
{
	expect_size(UMIG_OP_COMM, 16, 0);
	check(syscall2(__NR_prctl, PR_SET_NAME, payload), UMIG_OP_COMM, 0);
	return 0;
}

static u64 step_sigaction(void)
{
	const struct umig_sigaction *s = (const void *)payload;

	expect_size(UMIG_OP_SIGACTION, sizeof(*s), 0);
	/* handler, flags, restorer, mask: exactly the kernel's struct sigaction on x86_64 */
	check(syscall4(__NR_rt_sigaction, s->signo, &s->handler, 0, 8), UMIG_OP_SIGACTION,
	      s->signo);
	return s->signo;
}

static u64 step_sigaltstack(void)
{
	const struct umig_sigaltstack *s = (const void *)payload;

	expect_size(UMIG_OP_SIGALTSTACK, sizeof(*s), 0);
	/* the layout is the kernel's stack_t */
	check(syscall2(__NR_sigaltstack, s, 0), UMIG_OP_SIGALTSTACK, s->sp);
	return s->sp;
}

static u64 step_sigqueue(void)
{
	const struct umig_sigqueue *q = (const void *)payload;
	long pid;

	expect_size(UMIG_OP_SIGQUEUE, sizeof(*q), 0);
	/* Only a process queueing to itself may forge any si_code, so the restorer does it. */
	pid = syscall0(__NR_getpid);
	if (q->shared)
		check(syscall3(__NR_rt_sigqueueinfo, pid, q->signo, q->info), UMIG_OP_SIGQUEUE,
		      q->signo);
	else
		check(syscall4(__NR_rt_tgsigqueueinfo, pid, syscall0(__NR_gettid), q->signo, q->info),
		      UMIG_OP_SIGQUEUE, q->signo);
	return q->signo;
}

static u64 step_rseq(void)
{
	const struct umig_rseq *r = (const void *)payload;

	expect_size(UMIG_OP_RSEQ, sizeof(*r), 0);
	check(syscall4(__NR_rseq, r->address, r->length, r->flags, r->signature), UMIG_OP_RSEQ,
	      r->address);
	return r->address;
}

static u64 step_tid_address(void)
{
	expect_size(UMIG_OP_TID_ADDRESS, sizeof(u64), 0);
	syscall1(__NR_set_tid_address, *(const u64 *)payload); /* cannot fail: returns the TID */
	return *(const u64 *)payload;
}

static u64 step_creds(void)
{
	const struct umig_creds *c = (const void *)payload;

	expect_size(UMIG_OP_CREDS, sizeof(*c), payload_size >= sizeof(*c) ? 4ULL * c->ngroups : 0);
	/*
	 * Everything needing privilege first: groups, gids and fsgid (setresgid resets it), then
	 * uids, which drop the privilege, then fsuid (setresuid resets it; the image's fsuid was
	 * reachable from its uids, or it kept the privilege). setfs*id report no errors, only the
	 * previous value: read it back with an invalid id.
	 */
	check(syscall2(__NR_setgroups, c->ngroups, c + 1), UMIG_OP_CREDS, c->uid);
	check(syscall3(__NR_setresgid, c->gid, c->egid, c->sgid), UMIG_OP_CREDS, c->uid);
	syscall1(__NR_setfsgid, c->fsgid);
	if ((u32)syscall1(__NR_setfsgid, -1) != c->fsgid)
		fail(UMIG_OP_CREDS, -EPERM, c->uid);
	check(syscall3(__NR_setresuid, c->uid, c->euid, c->suid), UMIG_OP_CREDS, c->uid);
	syscall1(__NR_setfsuid, c->fsuid);
	if ((u32)syscall1(__NR_setfsuid, -1) != c->fsuid)
		fail(UMIG_OP_CREDS, -EPERM, c->uid);
	/* changing ids may have changed the flag: set the image's own, whatever it was */
	check(syscall2(__NR_prctl, PR_SET_DUMPABLE, c->dumpable ? 1 : 0), UMIG_OP_CREDS, c->uid);
	return c->uid;
}

static u64 step_vma_name(void)
{
	const struct umig_range *r = (const void *)payload;
	const char *name = (const char *)(r + 1);

	if (payload_size < sizeof(*r))
		fail(UMIG_OP_VMA_NAME, -EINVAL, payload_size);
	check(syscall5(__NR_prctl, PR_SET_VMA, PR_SET_VMA_ANON_NAME, r->start, r->length,
		       payload_size > sizeof(*r) ? name : 0),
	      UMIG_OP_VMA_NAME, r->start);
	return r->start;
}

static void __attribute__((noreturn)) step_finish(void)
{
	long ret;

	expect_size(UMIG_OP_FINISH, 0, 0);
	if (!hole.length) /* never relocated: the munmap below would not remove the restorer */
		fail(UMIG_OP_FINISH, -EINVAL, 0);
	send_report(UMIG_OP_FINISH, 0, hole.start);
	if (failed(syscall1(__NR_close, channel)))
		exit_group(1);
	/* the tracing agent takes over at this stop; untraced, we wait here for SIGCONT */
	if (failed(syscall2(__NR_kill, syscall0(__NR_getpid), SIGSTOP)))
		exit_group(1);
	/*
	 * This unmaps the code and stack we run on. The agent installs the image's registers at this
	 * syscall's exit stop; untraced, the next instruction fetch faults and the process dies.
	 */
	ret = syscall2(__NR_munmap, hole.start, hole.length);
	exit_group(ret ? 1 : 0);
}

static u64 execute(u32 op)
{
	switch (op) {
	case UMIG_OP_RELOCATE:
		step_relocate();
	case UMIG_OP_CLOSE_FDS:
		return step_close_fds();
	case UMIG_OP_UNMAP:
		return step_unmap();
	case UMIG_OP_MOVE:
		return step_move();
	case UMIG_OP_MAP:
		return step_map();
	case UMIG_OP_PROTECT:
		return step_protect();
	case UMIG_OP_MADVISE:
		return step_madvise();
	case UMIG_OP_MM:
		return step_mm();
	case UMIG_OP_OPEN_FD:
		return step_open_fd();
	case UMIG_OP_DUP:
		return step_dup();
	case UMIG_OP_ITIMER:
		return step_itimer();
	case UMIG_OP_USERFAULTFD:
		return step_userfaultfd();
	case UMIG_OP_CLOSE:
		return step_close();
	case UMIG_OP_CHDIR:
		return step_chdir();
	case UMIG_OP_UMASK:
		return step_umask();
	case UMIG_OP_RLIMIT:
		return step_rlimit();
	case UMIG_OP_PERSONALITY:
		return step_personality();
	case UMIG_OP_COMM:
		return step_comm();
	case UMIG_OP_SIGACTION:
		return step_sigaction();
	case UMIG_OP_SIGALTSTACK:
		return step_sigaltstack();
	case UMIG_OP_SIGQUEUE:
		return step_sigqueue();
	case UMIG_OP_RSEQ:
		return step_rseq();
	case UMIG_OP_TID_ADDRESS:
		return step_tid_address();
	case UMIG_OP_CREDS:
		return step_creds();
	case UMIG_OP_VMA_NAME:
		return step_vma_name();
	case UMIG_OP_FINISH:
		step_finish();
	default:
		fail(op, -ENOSYS, 0);
	}
}

static void __attribute__((noreturn)) serve(void)
{
	for (;;) {
		struct umig_command cmd;

		receive(&cmd, sizeof(cmd));
		if (cmd.size > UMIG_MAX_PAYLOAD)
			fail(cmd.op, -E2BIG, cmd.size);
		receive(payload, cmd.size);
		payload[cmd.size] = 0;
		payload_size = cmd.size;
		send_report(cmd.op, 0, execute(cmd.op));
	}
}

/* ---- start-up -------------------------------------------------------------------------------- */

enum mode { MODE_KEEP, MODE_NS, MODE_ANY };

static long clone3(struct clone_args *args)
{
	return syscall2(__NR_clone3, args, sizeof(*args));
}

static void __attribute__((noreturn)) restoring_child(void)
{
	u64 all = ~0ULL;

	/* Signals wait until the agent installs the image's own mask: the queued ones stay pending
	 * and nothing can interrupt a half-built process (SIGKILL and SIGSTOP excepted). */
	check(syscall4(__NR_rt_sigprocmask, SIG_SETMASK, &all, 0, sizeof(all)), UMIG_OP_READY, 0);
	send_report(UMIG_OP_READY, 0, (u64)(_end - __ehdr_start));
	serve();
}

static int exit_code_of(int status)
{
	if ((status & 0x7f) == 0)
		return (status >> 8) & 0xff;
	return 128 + (status & 0x7f);
}

/* PID 1 of the new namespace: clones the restoring child, then reaps until nothing is left. */
static void __attribute__((noreturn)) namespace_init(int pid)
{
	struct clone_args args;
	int set_tid = pid, status, restored_status = 1 << 8;
	long child, ret;

	memset(&args, 0, sizeof(args));
	args.exit_signal = SIGCHLD;
	args.set_tid = (u64)&set_tid;
	args.set_tid_size = 1;
	child = check(clone3(&args), UMIG_OP_CLONE, pid);
	if (child == 0)
		restoring_child();

	/* the channel must close when the restoring child's copy does */
	if (failed(syscall1(__NR_close, channel)))
		exit_group(1);
	for (;;) {
		ret = syscall4(__NR_wait4, -1, &status, __WALL, 0);
		if (ret == -EINTR)
			continue;
		if (failed(ret))
			break; /* ECHILD: the namespace is empty */
		if (ret == child)
			restored_status = status;
	}
	exit_group(exit_code_of(restored_status));
}

static int parse_number(const char *s, long *out)
{
	long n = 0;

	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || n > 0x7fffffff / 10)
			return -1;
		n = n * 10 + (*s - '0');
	}
	if (n > 0x7fffffff)
		return -1;
	*out = n;
	return 0;
}

static int same_string(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int parse_mode(const char *s)
{
	if (same_string(s, "keep"))
		return MODE_KEEP;
	if (same_string(s, "ns"))
		return MODE_NS;
	if (same_string(s, "any"))
		return MODE_ANY;
	return -1;
}

/* Entered from _start with the kernel's initial stack: argc, argv[], NULL, envp[], ... */
void __attribute__((noreturn, used)) launcher(long *initial_stack)
{
	long argc = initial_stack[0];
	char **argv = (char **)(initial_stack + 1);
	struct clone_args args;
	long fd, pid, child;
	int mode, set_tid;

	if (argc != 4 || parse_number(argv[1], &fd))
		exit_group(2); /* no channel to report on */
	channel = fd;
	mode = parse_mode(argv[2]);
	if (mode < 0 || parse_number(argv[3], &pid))
		fail(UMIG_OP_CLONE, -EINVAL, 0);

	memset(&args, 0, sizeof(args));
	/* CLONE_PARENT makes the child the agent's; the kernel then takes exit_signal from us */
	args.flags = CLONE_PARENT | (mode == MODE_NS ? CLONE_NEWPID : 0);
	if (mode == MODE_KEEP) {
		set_tid = pid;
		args.set_tid = (u64)&set_tid;
		args.set_tid_size = 1;
	}
	child = check(clone3(&args), UMIG_OP_CLONE, pid);
	if (child == 0) {
		if (mode == MODE_NS)
			namespace_init(pid);
		restoring_child();
	}
	send_report(UMIG_OP_HELLO, 0, child);
	exit_group(0);
}

__asm__(".text\n"
	".global _start\n"
	".type _start, @function\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call launcher\n"
	"	hlt\n");
