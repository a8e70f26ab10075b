/*
 * The restorer's wire protocol: the contract between the target agent (Python, umig/restorer.py)
 * and the freestanding restorer (restorer.c). Both sides are built from this one description;
 * umig/restorer.py mirrors these layouts with struct formats and must change with this file.
 *
 * All integers are little-endian, all structs are packed as declared (every field is naturally
 * aligned, so no padding is implied beyond the explicit `pad` fields).
 *
 * Start-up: the agent runs   umig-restorer CHANNEL_FD MODE PID
 *   CHANNEL_FD  a stream socket inherited from the agent (both directions)
 *   MODE        "keep": clone3 with set_tid = PID, the child takes the image's PID
 *               "ns":   clone3 CLONE_NEWPID; that child becomes the namespace's init and
 *                       clones the restoring child with PID as its PID inside the namespace
 *               "any":  clone3 without set_tid
 *   The process the agent starts (the launcher) clones with CLONE_PARENT, so the restoring
 *   child (or the namespace init) is the agent's own child. The launcher reports
 *   UMIG_OP_HELLO with detail = the PID of the child it cloned (as the agent sees it) and exits.
 *   The restoring child blocks every signal and reports UMIG_OP_READY with
 *   detail = the size in bytes of its own loaded image ([__ehdr_start, _end)).
 *   HELLO and READY come from two processes: they may arrive in either order. In "ns" mode a
 *   failing clone3 in the init is reported as UMIG_OP_CLONE instead of READY.
 *   From then on it reads commands until UMIG_OP_FINISH or a failure.
 *
 * Commands (agent -> restorer): struct umig_command, then `size` bytes of payload.
 * Reports  (restorer -> agent): struct umig_report, one per command. On failure the restorer reports error = -errno and
 *   detail = the address, fd or signal the step was working on, then exits with status 1.
 */
#ifndef UMIG_PROTOCOL_H
#define UMIG_PROTOCOL_H

#define UMIG_PROTOCOL_VERSION 2
#define UMIG_MAX_PAYLOAD (64 * 1024)
/* RELOCATE's range holds the image (rounded up to pages), then a stack of this size */
#define UMIG_RELOCATE_STACK (16 * 1024)

typedef unsigned long long u64;
typedef unsigned int u32;
typedef int s32;

enum umig_op {
	UMIG_OP_HELLO = 1,       /* report only: launcher, detail = child's PID */
	UMIG_OP_READY = 2,       /* report only: restoring child, detail = own image size */
	UMIG_OP_RELOCATE = 3,    /* struct umig_range: map the range, copy own image to its start, put
	                            the stack right above the image (UMIG_RELOCATE_STACK bytes), continue
	                            from the copy; the range becomes "the hole". The restorer never
	                            touches the rest of the range: the agent may park mappings there
	                            (the vDSO set on its way), as long as they leave before FINISH,
	                            which unmaps the whole range */
	UMIG_OP_CLOSE_FDS = 4,   /* u32 lowest: move the channel to the lowest free fd >= lowest,
	                            close every other fd; detail = the channel's new fd */
	UMIG_OP_UNMAP = 5,       /* struct umig_range: munmap */
	UMIG_OP_MOVE = 6,        /* struct umig_move: mremap(MREMAP_MAYMOVE|MREMAP_FIXED) (the vDSO set) */
	UMIG_OP_MAP = 7,         /* struct umig_map + path: mmap MAP_FIXED_NOREPLACE */
	/* 8 is free: pages are not the restorer's business (umig/state/memory.py writes them) */
	UMIG_OP_PROTECT = 9,     /* struct umig_protect: mprotect to the final protection */
	UMIG_OP_MM = 10,         /* struct umig_mm + auxv + exe path: prctl(PR_SET_MM, PR_SET_MM_MAP) */
	UMIG_OP_OPEN_FD = 11,    /* struct umig_open_fd + path */
	UMIG_OP_CHDIR = 12,      /* path */
	UMIG_OP_UMASK = 13,      /* u32 */
	UMIG_OP_RLIMIT = 14,     /* struct umig_rlimit: prlimit64(0, ...) */
	UMIG_OP_PERSONALITY = 15,/* u64 */
	UMIG_OP_COMM = 16,       /* 16 bytes, NUL padded: prctl(PR_SET_NAME) */
	UMIG_OP_SIGACTION = 17,  /* struct umig_sigaction: rt_sigaction */
	UMIG_OP_SIGALTSTACK = 18,/* struct umig_sigaltstack */
	UMIG_OP_SIGQUEUE = 19,   /* struct umig_sigqueue: queue a pending signal to itself */
	UMIG_OP_RSEQ = 20,       /* struct umig_rseq: rseq registration */
	UMIG_OP_TID_ADDRESS = 21,/* u64: set_tid_address */
	UMIG_OP_CREDS = 22,      /* struct umig_creds + u32 groups[ngroups] */
	UMIG_OP_FINISH = 23,     /* no payload: report, close the channel, stop itself with SIGSTOP,
	                            then munmap the hole; the agent, tracing it, catches the munmap's
	                            syscall-exit stop and installs the final registers */
	UMIG_OP_VMA_NAME = 24,   /* struct umig_range + name (the rest of the payload, not NUL
	                            terminated; empty clears the name):
	                            prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME) */
	UMIG_OP_CLONE = 25,      /* report only: the launcher's clone3 failed (detail = PID asked for) */
	UMIG_OP_MADVISE = 26,    /* struct umig_advice: madvise (flags /proc/PID/smaps shows as VmFlags) */
	UMIG_OP_DUP = 27,        /* struct umig_dup: dup3 (descriptors sharing one open file) */
	UMIG_OP_ITIMER = 28,     /* struct umig_itimer: setitimer (alarm() and setitimer() timers) */
	UMIG_OP_USERFAULTFD = 29,/* u64 features (UFFD_FEATURE_*): a userfaultfd; detail = its fd,
	                            which the agent takes with pidfd_getfd before UMIG_OP_CLOSE closes
	                            the restorer's copy, and registers ranges with itself */
	UMIG_OP_CLOSE = 30,      /* s32 fd */
};

struct umig_command {
	u32 op;
	u32 size; /* payload bytes that follow */
};

struct umig_report {
	u32 op;
	s32 error;  /* 0, or -errno */
	u64 detail;
};

struct umig_range {
	u64 start;
	u64 length;
};

struct umig_move {
	u64 from;
	u64 to;
	u64 length;
};

struct umig_map {
	u64 start;
	u64 length;
	u64 offset;     /* file offset in bytes */
	u32 prot;       /* PROT_* used while filling (the agent adds PROT_WRITE where pages follow) */
	u32 flags;      /* MAP_PRIVATE/MAP_SHARED/MAP_ANONYMOUS/MAP_GROWSDOWN; the restorer adds
	                   MAP_FIXED_NOREPLACE */
	u32 open_flags; /* O_RDONLY or O_RDWR for a file; ignored for MAP_ANONYMOUS */
	u32 path_length;/* 0 for anonymous; else the path's bytes follow, not NUL terminated */
};

struct umig_protect {
	u64 start;
	u64 length;
	u32 prot;
	u32 pad;
};

struct umig_advice {
	u64 start;
	u64 length;
	u32 advice;     /* MADV_* */
	u32 pad;
};

struct umig_mm {
	u64 start_code, end_code, start_data, end_data;
	u64 start_brk, brk, start_stack;
	u64 arg_start, arg_end, env_start, env_end;
	u32 auxv_size;   /* bytes of auxv that follow (pairs of u64) */
	u32 path_length; /* then the executable's path, not NUL terminated */
};

struct umig_open_fd {
	s32 fd;
	u32 flags;      /* open(2) flags as /proc/PID/fdinfo shows them; O_CREAT/O_TRUNC/O_EXCL are
	                   never sent; O_CLOEXEC becomes FD_CLOEXEC on the final fd */
	u64 offset;
	u32 seek;       /* 1: lseek to offset (regular files), 0: leave it (devices) */
	u32 path_length;
};

struct umig_dup {
	s32 from;
	s32 to;
	u32 cloexec;
	u32 pad;
};

struct umig_itimer {
	u32 which;      /* ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF */
	u32 pad;
	u64 interval_sec, interval_usec, value_sec, value_usec; /* struct itimerval */
};

struct umig_rlimit {
	u32 resource;
	u32 pad;
	u64 cur;
	u64 max;
};

struct umig_sigaction {
	u32 signo;
	u32 pad;
	u64 handler;
	u64 flags;
	u64 restorer;
	u64 mask;
};

struct umig_sigaltstack {
	u64 sp;
	s32 flags;
	u32 pad;
	u64 size;
};

struct umig_sigqueue {
	u32 signo;
	u32 shared;               /* 1: process-wide queue (rt_sigqueueinfo), 0: the thread's own */
	unsigned char info[128];  /* siginfo_t as PTRACE_PEEKSIGINFO returned it */
};

struct umig_rseq {
	u64 address;
	u32 length;
	u32 flags;
	u32 signature;
	u32 pad;
};

struct umig_creds {
	u32 uid, euid, suid, fsuid;
	u32 gid, egid, sgid, fsgid;
	u32 ngroups;
	u32 dumpable;  /* the dumpable flag to set afterwards (0 or 1): changing ids clears it, and a
	                  process may have cleared it itself (agents holding secrets do) */
};

#endif
