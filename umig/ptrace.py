"""Tracing one thread with ptrace(2): freeze it, read and write its CPU state, run syscalls inside it.

python-ptrace provides the register layout (``user_regs_struct``) and the syscall-name table; the
requests it lacks (SEIZE, INTERRUPT, GETREGSET for the xsave area, GET/SETSIGMASK, PEEKSIGINFO,
GET_SYSCALL_INFO, GET_RSEQ_CONFIGURATION) go through libc's ``ptrace`` via ctypes.

Threading: the kernel binds a tracee to the *thread* that attached it, not to the process. Every
ptrace request and every waitpid for a tracee must come from the OS thread that called
``seize()``; any other thread gets ESRCH/ECHILD. ``Tracee`` checks this and says so plainly.

Syscall restart, the one subtlety worth knowing before touching remote syscalls:
a thread frozen by PTRACE_INTERRUPT while blocked in a syscall (read, nanosleep, futex, ...) sits
in the kernel's signal path with ``orig_rax`` = the syscall number and ``rax`` = -ERESTART*.
When it leaves *that* stop with no signal to deliver, the kernel rewinds ``rip`` by 2 and restarts
the syscall. Injecting a syscall needs ``orig_rax = -1`` (otherwise that same logic would rewrite
the injected registers), and once an injected syscall has run, the thread no longer stands in that
signal path: it sits at the injected syscall's exit stop, where the kernel will not look at
-ERESTART* again. Writing the saved registers back verbatim would therefore hand -512 (or -516)
to the program as the result of its read or nanosleep. ``restart_registers()`` applies the kernel's
restart decision by hand, and a syscall session applies it when it puts the registers back, unless
a signal is about to be delivered: then the thread takes the signal path on its way out, and the
kernel decides (-EINTR for a handler without SA_RESTART) as it would have.
(PTRACE_DETACH happens to wake the thread through the signal path once more, which hides the
problem; PTRACE_CONT and PTRACE_SYSCALL do not. Nothing here relies on the former.)
"""
import ctypes
import errno
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from ptrace.binding.linux_struct import user_regs_struct
from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES

from umig import procfs
from umig.errors import UmigError

# Requests (linux/ptrace.h); the classic ones are stable across architectures.
PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

PTRACE_SYSCALL_INFO_NONE = 0
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
PTRACE_SYSCALL_INFO_SECCOMP = 3

NT_X86_XSTATE = 0x202

_REQUEST_NAMES = {
    PTRACE_CONT: "PTRACE_CONT", PTRACE_GETREGS: "PTRACE_GETREGS",
    PTRACE_SETREGS: "PTRACE_SETREGS", PTRACE_DETACH: "PTRACE_DETACH", PTRACE_SYSCALL: "PTRACE_SYSCALL",
    PTRACE_GETSIGINFO: "PTRACE_GETSIGINFO", PTRACE_GETREGSET: "PTRACE_GETREGSET",
    PTRACE_SETREGSET: "PTRACE_SETREGSET", PTRACE_SEIZE: "PTRACE_SEIZE",
    PTRACE_SETOPTIONS: "PTRACE_SETOPTIONS", PTRACE_GETEVENTMSG: "PTRACE_GETEVENTMSG",
    PTRACE_INTERRUPT: "PTRACE_INTERRUPT",
    PTRACE_PEEKSIGINFO: "PTRACE_PEEKSIGINFO", PTRACE_GETSIGMASK: "PTRACE_GETSIGMASK",
    PTRACE_SETSIGMASK: "PTRACE_SETSIGMASK", PTRACE_GET_SYSCALL_INFO: "PTRACE_GET_SYSCALL_INFO",
    PTRACE_GET_RSEQ_CONFIGURATION: "PTRACE_GET_RSEQ_CONFIGURATION",
}

# waitpid flag that also reports clone()d children and threads; os does not export it.
WALL = 0x40000000

# Kernel-internal restart codes (include/linux/errno.h): userspace must never see them.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
NR_restart_syscall = 219
# The calls that wait with a signal mask of their own and are restarted (-ERESTARTNOHAND), with
# where that mask is: rt_sigsuspend's first argument, ppoll's fourth, and the first word of a
# {mask, size} pair that pselect6's and io_pgetevents' sixth argument points to. (epoll_pwait and
# epoll_pwait2 fail with -EINTR instead: nothing to restart.)
NR_RT_SIGSUSPEND, NR_PSELECT6, NR_PPOLL, NR_IO_PGETEVENTS = 130, 270, 271, 333
_OWN_MASK = {NR_RT_SIGSUSPEND: ("rdi", False), NR_PPOLL: ("r10", False), NR_PSELECT6: ("r9", True),
             NR_IO_PGETEVENTS: ("r9", True)}

NR_READ = 0
NR_MMAP = 9
NR_MUNMAP = 11
NR_RT_SIGACTION = 13
NR_GETPID = 39
NR_KILL = 62

SIGINFO_SIZE = 128
SIGSET_SIZE = 8
# A sigset with every bit set; the kernel silently keeps SIGKILL and SIGSTOP unblocked.
ALL_SIGNALS = (1 << 64) - 1
_JOB_CONTROL = sum(1 << (s - 1) for s in (signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN,
                                          signal.SIGTTOU))

# Big enough for every xsave layout seen so far (AVX-512 + AMX tiles is about 11 KiB); the kernel
# says how much it filled, and the buffer grows if it ever fills one completely.
_XSTATE_INITIAL = 16 * 1024
# The kernel's own size for the xsave regset, learnt on the first GETREGSET: SETREGSET demands it.
_xstate_kernel_size = None

_SYSCALL_INSN = b"\x0f\x05"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class TraceError(OSError, UmigError):
    """A ptrace-level failure; str() is one line naming the operation, the pid and the cause."""

    def __init__(self, err, message):
        super().__init__(err, message)
        self.message = message

    def __str__(self):
        return self.message


class TraceeExited(TraceError):
    """The tracee died while we were waiting for it to stop."""

    def __init__(self, pid, stop, waiting_for):
        how = f"exited with code {stop.code}" if stop.kind == "exited" else f"was killed by signal {_signame(stop.signo)}"
        super().__init__(errno.ESRCH, f"pid {pid} {how} while waiting for {waiting_for}")
        self.stop = stop


def _signame(signo):
    try:
        return signal.Signals(signo).name
    except ValueError:
        return str(signo)


def _syscall_name(nr):
    return f"{SYSCALL_NAMES.get(nr, 'syscall')} ({nr})"


def _errno_text(value):
    """'EINVAL (Invalid argument)' for a negative syscall result."""
    code = -value
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def _to_signed(value):
    return value - (1 << 64) if value & (1 << 63) else value


# ---------------------------------------------------------------------------------------------------
# Registers


_REG_OFFSETS = {name: getattr(user_regs_struct, name).offset for name, _ in user_regs_struct._fields_}
_REG_SIZE = ctypes.sizeof(user_regs_struct)


class Registers:
    """The general-purpose registers of one thread, kept as the kernel's raw user_regs_struct bytes.

    The raw bytes are the truth (an image can store them verbatim); attributes read and write 64-bit
    fields by name: ``regs.rip``, ``regs.orig_rax = -1``. Reads are unsigned; use ``signed(name)``
    where the sign matters (rax, orig_rax).
    """
    __slots__ = ("_raw",)
    FIELDS = tuple(_REG_OFFSETS)
    SIZE = _REG_SIZE

    def __init__(self, raw=None):
        if raw is None:
            raw = bytes(_REG_SIZE)
        if len(raw) != _REG_SIZE:
            raise ValueError(f"user_regs_struct is {_REG_SIZE} bytes, got {len(raw)}")
        object.__setattr__(self, "_raw", bytearray(raw))

    @classmethod
    def from_bytes(cls, raw):
        return cls(raw)

    def to_bytes(self):
        return bytes(self._raw)

    def copy(self):
        return Registers(self._raw)

    def __getattr__(self, name):
        try:
            offset = _REG_OFFSETS[name]
        except KeyError:
            raise AttributeError(f"no register named {name!r}") from None
        return struct.unpack_from("<Q", self._raw, offset)[0]

    def __setattr__(self, name, value):
        try:
            offset = _REG_OFFSETS[name]
        except KeyError:
            raise AttributeError(f"no register named {name!r}") from None
        struct.pack_into("<Q", self._raw, offset, value & ((1 << 64) - 1))

    def signed(self, name):
        return _to_signed(getattr(self, name))

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    def __eq__(self, other):
        return isinstance(other, Registers) and self._raw == other._raw

    def __repr__(self):
        shown = ", ".join(f"{n}={getattr(self, n):#x}" for n in ("rip", "rsp", "rax", "orig_rax"))
        return f"Registers({shown})"


def restart_registers(regs, *, restart_block_valid, signal_coming=False):
    """The registers as the kernel leaves them when a stop inside an interrupted syscall ends with no
    signal delivered (arch/x86 signal code): -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND re-run the
    syscall; -ERESTART_RESTARTBLOCK runs restart_syscall, which only makes sense while the kernel
    still holds the thread's restart block (the source host): elsewhere it becomes -EINTR, as if a
    handler had run. ``orig_rax`` becomes -1 so that no later pass applies the restart twice.
    Anything else comes back unchanged (as a copy).

    With a signal ``signal_coming`` (Tracee.signal_coming) they come back unchanged too: the thread
    takes the signal path as it leaves whatever stop it is in, and the kernel decides there, as
    it would have (-EINTR where a handler without SA_RESTART runs, a restart where none does).

    One approximation is left: a call that waits with a mask of its own (sigsuspend, ppoll,
    pselect6) and blocks every signal that is coming is re-run, and the handler of a signal its
    own mask blocks but the thread's does not runs before it instead of after it returns.
    """
    out = regs.copy()
    if regs.signed("orig_rax") < 0 or signal_coming:
        return out
    result = regs.signed("rax")
    if result in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        out.rax = regs.orig_rax
        out.rip = regs.rip - 2
    elif result == -ERESTART_RESTARTBLOCK:
        if restart_block_valid:
            out.rax = NR_restart_syscall
            out.rip = regs.rip - 2
        else:
            out.rax = -errno.EINTR
    else:
        return out
    out.orig_rax = -1
    return out


def in_interrupted_syscall(regs):
    """True when the registers belong to a thread stopped inside a syscall the kernel will restart."""
    return regs.signed("orig_rax") >= 0 and -regs.signed("rax") in (
        ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)


# ---------------------------------------------------------------------------------------------------
# Small value types


@dataclass(frozen=True)
class Stop:
    """One decoded waitpid() status.

    kind: "syscall" (a syscall-enter or -exit stop; TRACESYSGOOD is always on), "signal" (a
    signal-delivery-stop for ``signo``), "event" (PTRACE_EVENT_* ``event``, e.g. PTRACE_EVENT_STOP;
    ``signo`` is SIGTRAP for an interrupt, the stop signal for a group-stop), "exited" (``code``),
    "killed" (``signo``).
    """
    kind: str
    signo: int = 0
    event: int = 0
    code: int = 0
    status: int = 0

    @property
    def stopped(self):
        return self.kind in ("syscall", "signal", "event")

    @property
    def group_stop(self):
        """A PTRACE_EVENT_STOP that reports job control (SIGSTOP & co), not our PTRACE_INTERRUPT."""
        return (self.kind == "event" and self.event == PTRACE_EVENT_STOP
                and self.signo in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))

    @classmethod
    def decode(cls, status):
        if os.WIFEXITED(status):
            return cls("exited", code=os.WEXITSTATUS(status), status=status)
        if os.WIFSIGNALED(status):
            return cls("killed", signo=os.WTERMSIG(status), status=status)
        if not os.WIFSTOPPED(status):
            raise ValueError(f"waitpid status {status:#x} is neither exit, kill nor stop")
        sig = os.WSTOPSIG(status)
        if sig == signal.SIGTRAP | 0x80:
            return cls("syscall", signo=signal.SIGTRAP, status=status)
        event = status >> 16
        if event:
            return cls("event", signo=sig, event=event, status=status)
        return cls("signal", signo=sig, status=status)

    def __str__(self):
        if self.kind == "signal":
            return f"signal-delivery-stop ({_signame(self.signo)})"
        if self.kind == "event":
            return f"ptrace event {self.event} stop ({_signame(self.signo)})"
        if self.kind == "exited":
            return f"exit (code {self.code})"
        if self.kind == "killed":
            return f"death by {_signame(self.signo)}"
        return "syscall stop"


class SyscallInfo(NamedTuple):
    """PTRACE_GET_SYSCALL_INFO: op is one of PTRACE_SYSCALL_INFO_*; nr/args at entry, rval at exit."""
    op: int
    instruction_pointer: int
    stack_pointer: int
    nr: int = -1
    args: tuple = ()
    rval: int = 0
    is_error: bool = False


class RseqConfiguration(NamedTuple):
    rseq_abi_pointer: int
    rseq_abi_size: int
    signature: int
    flags: int


class KernelSigaction(NamedTuple):
    """The kernel's struct sigaction on x86_64 (what rt_sigaction reads and writes): 32 bytes."""
    handler: int
    flags: int
    restorer: int
    mask: int

    SIZE = 32

    def to_bytes(self):
        return struct.pack("<QQQQ", self.handler, self.flags, self.restorer, self.mask)

    @classmethod
    def from_bytes(cls, raw):
        return cls(*struct.unpack("<QQQQ", raw[:32]))


class Buffer:
    """An argument of a batched syscall (SyscallSession.run_batch): the address of a buffer in the
    scratch area that holds `data` when the call runs, and afterwards, in `data`, what the call
    left there."""

    def __init__(self, size=0, data=b""):
        self.data = bytes(data) + bytes(max(size - len(data), 0))


class Call:
    """One syscall of a batch: its number and up to six arguments (integers or Buffers); `result`
    (rax, signed) once the batch has run."""

    def __init__(self, name, nr, *args):
        if len(args) > 6:
            raise ValueError("a syscall takes at most six arguments")
        self.name, self.nr, self.args = name, nr, args
        self.result = None


# The x86-64 encodings a batch is written in: movabs of a 64-bit immediate into rax and into the
# argument registers rdi, rsi, rdx, r10, r8, r9; syscall; movabs of rax to a 64-bit address.
_LOAD_RAX = b"\x48\xb8"
_LOAD_ARGUMENTS = (b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")
_STORE_RAX = b"\x48\xa3"
# tgkill(getpid(), gettid(), SIGSTOP), then a jump to itself, where the thread is caught.
_STOP_ITSELF = bytes.fromhex("48c7c027000000" "0f05" "4889c7"              # mov rax, 39; syscall; mov rdi, rax
                             "48c7c0ba000000" "0f05" "4889c6"              # mov rax, 186; syscall; mov rsi, rax
                             "48c7c213000000" "48c7c0ea000000" "0f05"      # mov rdx, 19; mov rax, 234; syscall
                             "ebfe")                                       # jmp .
_TRAP_FLAG = 0x100  # eflags.TF
_REGISTER = (1 << 64) - 1  # an integer argument as a 64-bit register holds it (negative ones too)
_CALL_CODE_SIZE = len(_LOAD_RAX) + 8 + 6 * (2 + 8) + len(_SYSCALL_INSN) + len(_STORE_RAX) + 8


def _aligned(size):
    return (size + 7) // 8 * 8


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class _RseqConfiguration(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def xstate_features(xstate):
    """The xfeatures mask (XCR0 as the kernel exposes it) recorded in an xsave image from
    PTRACE_GETREGSET: the kernel stores it in the first software-reserved word of the legacy area
    (offset 464, USER_XSTATE_XCR0_WORD). A restore target must offer every one of these bits."""
    if len(xstate) < 512:
        raise ValueError(f"an xsave image is at least 512 bytes, got {len(xstate)}")
    return struct.unpack_from("<Q", xstate, 464)[0]


# ---------------------------------------------------------------------------------------------------
# The tracee


class Tracee:
    """One thread under ptrace, attached with PTRACE_SEIZE (so no SIGSTOP is ever sent to it).

    ``with Tracee(pid).freeze() as t:`` seizes and stops it, and detaches on the way out.
    """

    def __init__(self, pid):
        self.pid = int(pid)
        self.attached = False
        self.stopped = False
        self.last_stop = None
        self._owner = None
        self._mem_fd = None
        self._gadget = None
        self._session = None

    def __repr__(self):
        state = "stopped" if self.stopped else ("running" if self.attached else "detached")
        return f"Tracee({self.pid}, {state})"

    # -- plumbing --------------------------------------------------------------------------------

    def _ptrace(self, request, addr=0, data=0, what=None):
        if self._owner is not None and threading.get_native_id() != self._owner:
            raise TraceError(errno.ESRCH, f"{what or _REQUEST_NAMES.get(request, request)} of pid {self.pid} "
                                          f"failed: ptrace calls must come from the thread that seized it "
                                          f"(native thread id {self._owner})")
        ctypes.set_errno(0)
        result = _libc.ptrace(request, self.pid, addr, data)
        if result == -1:
            err = ctypes.get_errno()
            if err:
                name = what or _REQUEST_NAMES.get(request, str(request))
                raise TraceError(err, f"{name} of pid {self.pid} failed: {os.strerror(err)}")
        return result

    def _require_stopped(self, what):
        if not self.stopped:
            raise TraceError(errno.ESRCH, f"{what} of pid {self.pid} needs it in a ptrace-stop; it is "
                                          f"{'running' if self.attached else 'not attached'}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Detach if still attached (tolerating a tracee that has died) and release the memory fd.
        At a signal-delivery-stop the signal is dropped: call detach(signo) to deliver it."""
        try:
            if self.attached:
                self.detach()
        except TraceError as e:
            if e.errno != errno.ESRCH:
                raise
        finally:
            self.attached = self.stopped = False
            self._close_mem()

    def _close_mem(self):
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    # -- attach, stop, resume --------------------------------------------------------------------

    @classmethod
    def adopted(cls, pid):
        """A child the kernel attached to this thread's tracee's tracer as it was forked
        (PTRACE_O_TRACEFORK): traced already, it reports a PTRACE_EVENT_STOP first."""
        child = cls(pid)
        child._owner = threading.get_native_id()
        child.attached = True
        return child

    def set_options(self, options):
        """PTRACE_SETOPTIONS (stopped), TRACESYSGOOD always among them, as at the seize."""
        self._require_stopped("PTRACE_SETOPTIONS")
        self._ptrace(PTRACE_SETOPTIONS, 0, options | PTRACE_O_TRACESYSGOOD)

    def event_message(self):
        """PTRACE_GETEVENTMSG: at a fork event stop, the new child's pid."""
        message = ctypes.c_ulong()
        self._ptrace(PTRACE_GETEVENTMSG, 0, ctypes.addressof(message))
        return message.value

    def seize(self, options=0):
        """PTRACE_SEIZE: become the tracer without stopping the thread. TRACESYSGOOD is always added,
        since syscall stops must be told apart from SIGTRAP deliveries."""
        self._owner = threading.get_native_id()
        try:
            self._ptrace(PTRACE_SEIZE, 0, options | PTRACE_O_TRACESYSGOOD)
        except TraceError:
            self._owner = None
            raise
        self.attached = True
        self.stopped = False
        self.last_stop = None
        return self

    def interrupt(self, seen=None):
        """Stop the thread with PTRACE_INTERRUPT and wait for its PTRACE_EVENT_STOP. Signals that get
        there first are delivered (the kernel keeps the interrupt pending meanwhile), other stops
        passed on, each shown to `seen` first. A group-stop (the thread was already stopped by
        SIGSTOP & co) is also a PTRACE_EVENT_STOP: see ``Stop.group_stop``. Returns the stop."""
        if self.stopped:
            return self.last_stop
        try:
            self._ptrace(PTRACE_INTERRUPT)
        except TraceError as e:
            # A tracee that has just died refuses requests; its exit status says what happened.
            if e.errno != errno.ESRCH:
                raise
            try:
                stop = self.wait(timeout=1.0)
            except TraceError:
                raise e from None
            if not stop.stopped:
                raise TraceeExited(self.pid, stop, "the PTRACE_INTERRUPT stop") from None
            raise e
        while True:
            stop = self.wait()
            if stop.kind == "event" and stop.event == PTRACE_EVENT_STOP:
                return stop
            if stop.kind in ("exited", "killed"):
                raise TraceeExited(self.pid, stop, "the PTRACE_INTERRUPT stop")
            # A signal-delivery-stop must not eat the signal; a syscall or other event stop carries
            # nothing to hand on. Either way the interrupt trap comes next.
            if seen:
                seen(stop)
            self.cont(stop.signo if stop.kind == "signal" else 0)

    def freeze(self):
        """seize() + interrupt(); returns self, ready for a with-statement."""
        self.seize()
        try:
            self.interrupt()
        except BaseException:
            self.close()
            raise
        return self

    def wait(self, timeout=None):
        """waitpid(pid, __WALL), decoded. With a timeout (seconds), polls and raises TraceError
        (ETIMEDOUT) if nothing happens in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                pid, status = os.waitpid(self.pid, WALL | (os.WNOHANG if deadline is not None else 0))
            except ChildProcessError:
                raise TraceError(errno.ECHILD, f"waitpid of pid {self.pid} failed: {os.strerror(errno.ECHILD)} "
                                               f"(not traced by this thread, or already reaped)") from None
            if pid:
                break
            if time.monotonic() >= deadline:
                raise TraceError(errno.ETIMEDOUT, f"waitpid of pid {self.pid} failed: no stop within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self._reached(status)

    def poll_stop(self):
        """The tracee's next stop or end if one is waiting, else None (never blocks)."""
        pid, status = os.waitpid(self.pid, WALL | os.WNOHANG)
        return self._reached(status) if pid else None

    def _reached(self, status):
        """The stop or end a waitpid status tells of; an end leaves nothing to trace."""
        stop = Stop.decode(status)
        self.last_stop, self.stopped = stop, stop.stopped
        if not stop.stopped:
            self.attached = False
            self._close_mem()
        return stop

    def cont(self, sig=0):
        """PTRACE_CONT, delivering ``sig`` if the thread is at a signal-delivery-stop."""
        self._ptrace(PTRACE_CONT, 0, sig)
        self.stopped = False

    def listen(self):
        """PTRACE_LISTEN: leave a group-stopped tracee stopped, as job control asked, while still
        hearing of what ends the stop (SIGCONT). A listening tracee takes requests again only
        after an interrupt (detach() sends one)."""
        self._ptrace(PTRACE_LISTEN)
        self.stopped = False

    def resume_syscall(self, sig=0):
        """PTRACE_SYSCALL: run until the next syscall entry or exit."""
        self._ptrace(PTRACE_SYSCALL, 0, sig)
        self.stopped = False

    def detach(self, sig=0, seen=None):
        """PTRACE_DETACH. A running tracee is interrupted first, since the kernel only detaches from
        a stopped one (the stops on the way are shown to `seen`). A thread that was group-stopped
        goes back to its group-stop."""
        if not self.attached:
            return
        if not self.stopped:
            self.interrupt(seen)
        try:
            self._ptrace(PTRACE_DETACH, 0, sig)
        finally:
            self.attached = self.stopped = False
            self._owner = None
            self._close_mem()

    def kill(self):
        """SIGKILL, then reap the death notice (we get one as tracer and/or parent)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                _, status = os.waitpid(self.pid, WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
        self.attached = self.stopped = False
        self._close_mem()

    # -- CPU state -------------------------------------------------------------------------------

    def get_registers(self):
        buf = ctypes.create_string_buffer(_REG_SIZE)
        self._ptrace(PTRACE_GETREGS, 0, ctypes.addressof(buf))
        return Registers(buf.raw)

    def set_registers(self, regs):
        buf = ctypes.create_string_buffer(regs.to_bytes(), _REG_SIZE)
        self._ptrace(PTRACE_SETREGS, 0, ctypes.addressof(buf))

    def get_xstate(self):
        """The thread's xsave area in the standard (uncompacted) format, as long as the kernel's
        regset: x87/SSE legacy area, xsave header, then AVX, AVX-512, PKRU, ... components."""
        global _xstate_kernel_size
        size = _xstate_kernel_size or _XSTATE_INITIAL
        while True:
            buf = ctypes.create_string_buffer(size)
            iov = _Iovec(ctypes.addressof(buf), size)
            self._ptrace(PTRACE_GETREGSET, NT_X86_XSTATE, ctypes.addressof(iov), what="PTRACE_GETREGSET(NT_X86_XSTATE)")
            if iov.iov_len < size or size == _xstate_kernel_size:
                _xstate_kernel_size = iov.iov_len
                return buf.raw[:iov.iov_len]
            size *= 2

    def set_xstate(self, data):
        """Write an xsave area back. The kernel takes exactly its own regset size; a shorter image
        (from a CPU with fewer features) is zero-padded, which is sound as long as its header does
        not claim components this CPU lacks (the kernel refuses those with EINVAL)."""
        if _xstate_kernel_size is None:
            self.get_xstate()
        if len(data) > _xstate_kernel_size:
            raise TraceError(errno.EINVAL, f"PTRACE_SETREGSET(NT_X86_XSTATE) of pid {self.pid} failed: image of "
                                           f"{len(data)} bytes exceeds this kernel's xsave area ({_xstate_kernel_size})")
        data = bytes(data) + bytes(_xstate_kernel_size - len(data))
        buf = ctypes.create_string_buffer(data, len(data))
        iov = _Iovec(ctypes.addressof(buf), len(data))
        self._ptrace(PTRACE_SETREGSET, NT_X86_XSTATE, ctypes.addressof(iov), what="PTRACE_SETREGSET(NT_X86_XSTATE)")

    # -- signals ---------------------------------------------------------------------------------

    def get_sigmask(self):
        """The blocked-signal mask (bit n-1 for signal n). Inside sigsuspend/ppoll/pselect the
        kernel reports the mask the program will get back, not the temporary one."""
        buf = ctypes.c_uint64()
        self._ptrace(PTRACE_GETSIGMASK, SIGSET_SIZE, ctypes.addressof(buf))
        return buf.value

    def set_sigmask(self, mask):
        """Set the blocked mask. This also cancels a pending 'restore the saved mask' (the temporary
        mask of sigsuspend & co), so pair it with a get_sigmask() taken first."""
        buf = ctypes.c_uint64(mask & ALL_SIGNALS)
        self._ptrace(PTRACE_SETSIGMASK, SIGSET_SIZE, ctypes.addressof(buf))

    def pending_signals(self, shared, batch=32):
        """Queued siginfos (128 raw bytes each), oldest first: the thread's own queue, or with
        shared=True the process-wide one. Nothing is dequeued."""
        out = []
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
        while True:
            args = _PeekSiginfoArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
            n = self._ptrace(PTRACE_PEEKSIGINFO, ctypes.addressof(args), ctypes.addressof(buf))
            raw = buf.raw
            out.extend(raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))
            if n < batch:
                return out

    def pending_signals_mask(self):
        """Every signal pending for the thread or the process (bit n-1 for signal n). /proc, not
        PTRACE_PEEKSIGINFO: past the queue's limit a signal is pending without a record to peek."""
        status = procfs.status(self.pid)
        return int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)

    def signal_coming(self, regs, mask):
        """Whether a signal will be delivered as the stopped thread, interrupted in the syscall of
        `regs`, runs on with blocked-signal `mask`, or in a call that waits with a mask of its
        own, with that one: ptrace shows the mask the call puts back when it returns, and a
        signal only the call's own mask blocks waits for that. Job control's signals do not
        count: a SIGCONT sent meanwhile discards a pending stop signal (and a stop signal a
        pending SIGCONT), and the thread would leave without one."""
        own = self._own_mask(regs)
        return bool(self.pending_signals_mask() & ~(mask if own is None else own) & ~_JOB_CONTROL)

    def _own_mask(self, regs):
        """The mask a sigsuspend, ppoll, pselect6 or io_pgetevents the thread is in waits with,
        read from its arguments; None if it is in none of them, or waits without one."""
        if regs.signed("rax") != -ERESTARTNOHAND or regs.orig_rax not in _OWN_MASK:
            return None
        register, in_a_pair = _OWN_MASK[regs.orig_rax]
        address = getattr(regs, register)
        try:
            if in_a_pair and address:
                address = struct.unpack("<Q", self.read_memory(address, 8))[0]
            return struct.unpack("<Q", self.read_memory(address, 8))[0] if address else None
        except TraceError:
            return None  # the kernel could not have read it either: the call failed

    def get_siginfo(self):
        """The siginfo of the current signal-delivery-stop or event stop (PTRACE_GETSIGINFO)."""
        buf = ctypes.create_string_buffer(SIGINFO_SIZE)
        self._ptrace(PTRACE_GETSIGINFO, 0, ctypes.addressof(buf))
        return buf.raw

    # -- other state -----------------------------------------------------------------------------

    def rseq_configuration(self):
        """The registered rseq area, or None if the thread has none (e.g. glibc.pthread.rseq=0)."""
        conf = _RseqConfiguration()
        self._ptrace(PTRACE_GET_RSEQ_CONFIGURATION, ctypes.sizeof(conf), ctypes.addressof(conf))
        if conf.rseq_abi_pointer == 0:
            return None
        return RseqConfiguration(conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature, conf.flags)

    def syscall_info(self):
        """PTRACE_GET_SYSCALL_INFO: whether this stop is a syscall entry or exit, and which."""
        buf = ctypes.create_string_buffer(88)
        self._ptrace(PTRACE_GET_SYSCALL_INFO, len(buf), ctypes.addressof(buf))
        raw = buf.raw
        op, = struct.unpack_from("<B", raw, 0)
        ip, sp = struct.unpack_from("<QQ", raw, 8)
        if op in (PTRACE_SYSCALL_INFO_ENTRY, PTRACE_SYSCALL_INFO_SECCOMP):
            nr, *args = struct.unpack_from("<Q6Q", raw, 24)
            return SyscallInfo(op, ip, sp, nr=nr, args=tuple(args))
        if op == PTRACE_SYSCALL_INFO_EXIT:
            rval, is_error = struct.unpack_from("<qB", raw, 24)
            return SyscallInfo(op, ip, sp, rval=rval, is_error=bool(is_error))
        return SyscallInfo(op, ip, sp)

    # -- memory ----------------------------------------------------------------------------------

    def _mem(self):
        if self._mem_fd is None:
            try:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise TraceError(e.errno, f"opening /proc/{self.pid}/mem failed: {e.strerror}") from None
        return self._mem_fd

    def read_memory(self, address, size):
        """Bytes from the tracee's address space; page protections do not apply."""
        fd = self._mem()
        chunks = []
        done = 0
        while done < size:
            try:
                chunk = os.pread(fd, size - done, address + done)
            except OSError as e:
                raise TraceError(e.errno, f"reading {size} bytes at {address + done:#x} of pid {self.pid} "
                                          f"failed: {e.strerror}") from None
            if not chunk:
                raise TraceError(errno.EIO, f"reading {size} bytes at {address + done:#x} of pid {self.pid} "
                                            f"failed: {os.strerror(errno.EIO)}")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def write_memory(self, address, data):
        fd = self._mem()
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], address + done)
            except OSError as e:
                raise TraceError(e.errno, f"writing {len(view)} bytes at {address + done:#x} of pid {self.pid} "
                                          f"failed: {e.strerror}") from None
            if n == 0:
                raise TraceError(errno.EIO, f"writing {len(view)} bytes at {address + done:#x} of pid {self.pid} "
                                            f"failed: {os.strerror(errno.EIO)}")
            done += n

    # -- remote syscalls -------------------------------------------------------------------------

    def find_syscall_gadget(self):
        """Address of a `syscall` instruction (0f 05) in executable memory of the tracee: the vDSO
        first (small, always there), then libc's text, then any executable mapping. Jumping into
        the middle of a longer instruction is fine: only those two bytes ever execute."""
        if self._gadget is not None:
            try:
                if self.read_memory(self._gadget, 2) == _SYSCALL_INSN:
                    return self._gadget
            except TraceError:
                pass  # no longer mapped there (the process ran, and may have exec'd, meanwhile)
        self._gadget = None
        with open(f"/proc/{self.pid}/maps") as f:
            regions = []
            for line in f:
                fields = line.split(None, 5)
                perms = fields[1]
                path = fields[5].strip() if len(fields) > 5 else ""
                if "x" not in perms or path == "[vsyscall]":
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                rank = 0 if path == "[vdso]" else 1 if "/libc" in path else 2
                regions.append((rank, start, end))
        for _, start, end in sorted(regions):
            step = 64 * 1024
            for chunk_start in range(start, end, step):
                # Overlap by one byte so an instruction split across chunks is still found.
                chunk_end = min(end, chunk_start + step + 1)
                try:
                    data = self.read_memory(chunk_start, chunk_end - chunk_start)
                except TraceError:
                    break
                at = data.find(_SYSCALL_INSN)
                if at >= 0:
                    self._gadget = chunk_start + at
                    return self._gadget
        raise TraceError(errno.ENOENT, f"finding a syscall instruction in pid {self.pid} failed: "
                                       f"no executable mapping holds one")

    def syscall_session(self):
        """A context manager for a run of remote syscalls that share one save/restore of the
        thread's registers and signal mask (and one scratch page, if asked for)."""
        return SyscallSession(self)

    def syscall(self, nr, *args):
        """Run one syscall inside the stopped tracee; returns the raw result (-errno on failure).
        Inside an open syscall_session() it runs there, else in a session of its own."""
        if self._session is not None:
            return self._session.syscall(nr, *args)
        with SyscallSession(self) as session:
            return session.syscall(nr, *args)

    # -- target-side hand-off ---------------------------------------------------------------------

    def finish_restore(self, final_regs, xstate, sigmask, timeout=None):
        """Take over a restorer that has laid out the process image and now stops itself with SIGSTOP,
        then munmaps its own code: catch it at the end of that munmap (so no restorer code is left
        and no restorer instruction runs again) and install the program's registers, xsave area and
        signal mask. It stays stopped there: detach() lets it run, once the source has committed.

        The tracee must have been seized before it raised SIGSTOP: a completed group-stop would
        stop the program again as soon as we detach. ``final_regs`` get restart_registers(...,
        restart_block_valid=False), a no-op for registers already fixed up.
        """
        stop = self.last_stop if self.stopped else None
        while True:
            if stop is None:
                stop = self.wait(timeout)
            if stop.kind in ("exited", "killed"):
                raise TraceeExited(self.pid, stop, "the restorer's SIGSTOP")
            if stop.group_stop:
                raise TraceError(errno.EINVAL, f"finishing the restore of pid {self.pid} failed: it was in a "
                                               f"group-stop (seize the restorer before it raises SIGSTOP)")
            if stop.kind == "signal" and stop.signo == signal.SIGSTOP:
                break
            # Another signal is not ours to swallow; a leftover interrupt or syscall stop carries
            # nothing. Either way, on to the SIGSTOP.
            self.cont(stop.signo if stop.kind == "signal" else 0)
            stop = None
        # Resuming with signal 0 discards the SIGSTOP, so the process never enters a group-stop.
        self.resume_syscall(0)
        self._expect_syscall(NR_MUNMAP, PTRACE_SYSCALL_INFO_ENTRY, "the restorer's munmap", timeout)
        self.resume_syscall(0)
        self._expect_syscall(NR_MUNMAP, PTRACE_SYSCALL_INFO_EXIT, "the restorer's munmap", timeout)
        result = self.get_registers().signed("rax")
        if result != 0:
            raise TraceError(-result if result < 0 else errno.EINVAL,
                             f"munmap of the restorer in pid {self.pid} failed: "
                             f"{_errno_text(result) if result < 0 else result}")
        self.set_registers(restart_registers(final_regs, restart_block_valid=False,
                                             signal_coming=self.signal_coming(final_regs, sigmask)))
        self.set_xstate(xstate)
        self.set_sigmask(sigmask)

    def _expect_syscall(self, nr, op, what, timeout=None):
        """Wait for the syscall-enter or -exit stop of ``nr``; anything else is an error."""
        stop = self.wait(timeout)
        if stop.kind in ("exited", "killed"):
            raise TraceeExited(self.pid, stop, what)
        phase = "entry" if op == PTRACE_SYSCALL_INFO_ENTRY else "exit"
        if stop.kind != "syscall":
            raise TraceError(errno.EINVAL, f"waiting for the {phase} of {what} in pid {self.pid} failed: "
                                           f"got a {stop}")
        info = self.syscall_info()
        if info.op != op:
            raise TraceError(errno.EINVAL, f"waiting for the {phase} of {what} in pid {self.pid} failed: "
                                           f"stopped at a syscall {'entry' if info.op == 1 else 'exit'}")
        if op == PTRACE_SYSCALL_INFO_ENTRY and info.nr != nr:
            raise TraceError(errno.EINVAL, f"waiting for the {phase} of {what} in pid {self.pid} failed: "
                                           f"it entered {_syscall_name(info.nr)} instead")
        return info


class SyscallSession:
    """Remote syscalls in a stopped tracee, sharing one register/sigmask save and restore.

    Usable from an interrupt stop (PTRACE_EVENT_STOP, including a group-stop) or a syscall-exit
    stop; refused at a signal-delivery-stop (resuming would drop that signal) and at a syscall
    entry (the kernel would go on to run the pending syscall). While it is open every signal is
    blocked, so nothing runs a handler between injected calls; SIGSTOP cannot be blocked and, if
    it arrives, is passed on (the process ends up stopped after detach, as it should).

    Injected calls run with rip outside the program's code; if the thread was stopped inside an
    rseq critical section, read its rseq area first (the kernel may clear rseq_cs on the way out).

    On close the thread is left at the exit stop of the last injected syscall with its original
    registers and mask, except that an interrupted syscall has its restart applied
    (restart_registers with restart_block_valid=True), unless a signal is coming to decide it:
    see the module docstring.
    """

    def __init__(self, tracee):
        self.tracee = tracee
        self._saved_regs = None
        self._saved_mask = None
        self._fix_restart = False
        self._scratch = None
        self._scratch_size = 0
        self._runs_code = False
        self._ran = False

    def __enter__(self):
        t = self.tracee
        t._require_stopped("a remote syscall")
        if t._session is not None:
            raise TraceError(errno.EBUSY, f"opening a syscall session in pid {t.pid} failed: one is already open")
        stop = t.last_stop
        if stop is not None and stop.kind == "signal":
            raise TraceError(errno.EINVAL, f"a remote syscall in pid {t.pid} failed: it is at a {stop}; "
                                           f"resume or deliver that signal first")
        if stop is not None and stop.kind == "syscall":
            if t.syscall_info().op != PTRACE_SYSCALL_INFO_EXIT:
                raise TraceError(errno.EINVAL, f"a remote syscall in pid {t.pid} failed: it is at a syscall "
                                               f"entry; only an interrupt stop or a syscall exit will do")
        self._gadget = t.find_syscall_gadget()
        self._saved_regs = t.get_registers()
        self._saved_mask = t.get_sigmask()
        # Only a stop inside the signal path (the interrupt) still has the kernel's restart ahead of
        # it; at a syscall-exit stop the kernel runs its restart logic after we leave, as usual.
        self._fix_restart = (stop is None or stop.kind == "event") and in_interrupted_syscall(self._saved_regs)
        t.set_sigmask(ALL_SIGNALS)
        t._session = self
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(quiet=exc_type is not None)
        return False

    def close(self, quiet=False):
        t = self.tracee
        if t._session is not self:
            return
        try:
            if self._scratch is not None and t.stopped:
                address, self._scratch = self._scratch, None
                result = self.syscall(NR_MUNMAP, address, self._scratch_size)
                if result != 0 and not quiet:
                    raise TraceError(-result, f"remote munmap of the scratch page in pid {t.pid} failed: "
                                              f"{_errno_text(result)}")
            if t.stopped:
                regs = self._saved_regs
                if self._ran and self._fix_restart:
                    regs = restart_registers(regs, restart_block_valid=True,
                                             signal_coming=t.signal_coming(regs, self._saved_mask))
                t.set_registers(regs)
                t.set_sigmask(self._saved_mask)
        except TraceError:
            if not quiet:
                raise
        finally:
            t._session = None

    def syscall(self, nr, *args):
        """Run syscall ``nr`` with up to six integer arguments; returns rax, signed."""
        t = self.tracee
        if t._session is not self:
            raise TraceError(errno.EINVAL, f"a remote syscall in pid {t.pid} failed: the session is closed")
        if len(args) > 6:
            raise ValueError("a syscall takes at most six arguments")
        t._require_stopped(f"remote {_syscall_name(nr)}")
        regs = self._saved_regs.copy()
        regs.rip = self._gadget
        regs.rax = nr
        # orig_rax = -1 keeps the kernel's syscall-restart logic off our registers when the thread
        # leaves an interrupt stop that sat inside a syscall.
        regs.orig_rax = -1
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value)
        t.set_registers(regs)
        self._ran = True
        what = f"remote {_syscall_name(nr)}"
        self._step_to(nr, PTRACE_SYSCALL_INFO_ENTRY, what)
        self._step_to(nr, PTRACE_SYSCALL_INFO_EXIT, what)
        return t.get_registers().signed("rax")

    def _step_to(self, nr, op, what):
        t = self.tracee
        t.resume_syscall(0)
        while True:
            stop = t.wait()
            if stop.kind in ("exited", "killed"):
                raise TraceeExited(t.pid, stop, what)
            if stop.kind == "syscall":
                info = t.syscall_info()
                if info.op != op or (op == PTRACE_SYSCALL_INFO_ENTRY and info.nr != nr):
                    raise TraceError(errno.EINVAL, f"{what} in pid {t.pid} failed: unexpected syscall "
                                                   f"{'entry' if info.op == 1 else 'exit'} stop "
                                                   f"(nr {info.nr}) at {info.instruction_pointer:#x}")
                return
            if stop.kind == "event":
                # A late interrupt or a group-stop: nothing to hand on.
                t.resume_syscall(0)
                continue
            if stop.kind == "signal" and stop.signo == signal.SIGSTOP:
                # Unblockable; passing it on lets job control take its course.
                t.resume_syscall(signal.SIGSTOP)
                continue
            # All else is blocked, so this is a synchronous fault at the gadget.
            raise TraceError(errno.EFAULT, f"{what} in pid {t.pid} failed: {stop} at the syscall "
                                           f"instruction {self._gadget:#x}")

    # -- helpers built on remote syscalls -----------------------------------------------------------

    def scratch(self, size=4096):
        """Address of a private anonymous mapping in the tracee (made on first use and unmapped
        when the session closes), for syscalls that take or return buffers and for batches."""
        if self._scratch is None:
            flags = 0x02 | 0x20         # MAP_PRIVATE | MAP_ANONYMOUS
            # PROT_READ | PROT_WRITE | PROT_EXEC: batches run there. A process under
            # PR_SET_MDWE (or a policy against writable code) is refused that: its batches run
            # one call at a time then.
            result = self.syscall(NR_MMAP, 0, size, 0x1 | 0x2 | 0x4, flags, -1, 0)
            self._runs_code = not (-4096 < result < 0)
            if not self._runs_code:
                result = self.syscall(NR_MMAP, 0, size, 0x1 | 0x2, flags, -1, 0)
            if -4096 < result < 0:
                raise TraceError(-result, f"remote mmap of a scratch page in pid {self.tracee.pid} failed: "
                                          f"{_errno_text(result)}")
            self._scratch, self._scratch_size = result, size
        elif size > self._scratch_size:
            raise ValueError(f"scratch area is {self._scratch_size} bytes, {size} asked for")
        return self._scratch

    def run_batch(self, calls):
        """Run `calls` one after another inside the tracee, in one go: code written into the
        scratch area loads each call's registers, runs it and stores its result, then the thread
        sends itself a SIGSTOP, caught here at its delivery and never delivered. One stop for the
        whole batch, where a call injected alone costs two, each a wake-up of the tracee (tens of
        microseconds in a VM). Not an int3, nor the trap flag: the kernel resets the handler of a
        SIGTRAP it forces while that signal is blocked. A stop signal discards a pending SIGCONT:
        with one pending the calls run one at a time instead, and one that comes during the
        batch is sent again after it (the process then sees it sent by itself). A SIGSTOP someone
        else sends in the very microseconds the batch's own is sent merges with it (legacy
        signals queue once). As many calls go at once as the scratch area holds; where the
        scratch area cannot be executable, they run one at a time."""
        self.scratch()
        group, size = [], len(_STOP_ITSELF) + 8
        for call in calls:
            need = _CALL_CODE_SIZE + 8 + sum(_aligned(len(arg.data)) for arg in call.args if isinstance(arg, Buffer))
            if group and size + need > self._scratch_size:
                self._run_group(group)
                group, size = [], len(_STOP_ITSELF) + 8
            group.append(call)
            size += need
        if group:
            self._run_group(group)

    def _run_group(self, calls):
        t = self.tracee
        code_size = _CALL_CODE_SIZE * len(calls) + len(_STOP_ITSELF)
        results = self._scratch + _aligned(code_size)
        data, address = [], results + 8 * len(calls)
        arguments = []
        for call in calls:
            values = []
            for arg in call.args:
                if isinstance(arg, Buffer):
                    values.append(address)
                    data.append((arg, address))
                    address += _aligned(len(arg.data))
                else:
                    values.append(arg & _REGISTER)
            arguments.append(values)
        if address - self._scratch > self._scratch_size:
            raise ValueError(f"a syscall needs {address - self._scratch} bytes of scratch, {self._scratch_size} there")
        image = bytearray(address - results)
        for buffer, at in data:
            image[at - results:at - results + len(buffer.data)] = buffer.data
        if not self._runs_code or self._pending(signal.SIGCONT):
            t.write_memory(results, image)
            for i, (call, values) in enumerate(zip(calls, arguments)):
                t.write_memory(results + 8 * i, struct.pack("<q", self.syscall(call.nr, *values)))
        else:
            code = bytearray()
            for i, (call, values) in enumerate(zip(calls, arguments)):
                code += _LOAD_RAX + struct.pack("<Q", call.nr)
                for load, value in zip(_LOAD_ARGUMENTS, values + [0] * (6 - len(values))):
                    code += load + struct.pack("<Q", value)
                code += _SYSCALL_INSN + _STORE_RAX + struct.pack("<Q", results + 8 * i)
            code += _STOP_ITSELF
            t.write_memory(self._scratch, bytes(code) + bytes(results - self._scratch - len(code)) + image)
            if self._run_code(self._scratch, self._scratch + len(code) - 2):
                # A SIGCONT came meanwhile: its ptrace trap showed it. If it came before the
                # batch's SIGSTOP, that stop discarded it: it is sent again (still blocked, it
                # waits for the session's end; a second one pending merges with the first).
                self.syscall(NR_KILL, self.syscall(NR_GETPID), signal.SIGCONT)
        answers = t.read_memory(results, address - results)
        for i, call in enumerate(calls):
            call.result = struct.unpack_from("<q", answers, 8 * i)[0]
        for buffer, at in data:
            buffer.data = answers[at - results:at - results + len(buffer.data)]

    def _pending(self, signo):
        return bool(self.tracee.pending_signals_mask() & 1 << (signo - 1))

    def _run_code(self, start, end):
        """Run the tracee from `start` until it stops itself with rip at `end`. Returns whether
        a SIGCONT came meanwhile (to a seized thread it shows as a ptrace trap)."""
        t = self.tracee
        regs = self._saved_regs.copy()
        regs.rip = start
        regs.orig_rax = -1  # as for a single injected syscall: no restart logic on these registers
        regs.eflags &= ~_TRAP_FLAG  # a program that single-steps itself: not through our code
        t.set_registers(regs)
        self._ran = True
        continued = False
        t.cont(0)
        while True:
            stop = t.wait()
            if stop.kind in ("exited", "killed"):
                raise TraceeExited(t.pid, stop, "a batch of remote syscalls")
            at_end = t.get_registers().rip == end
            continued |= stop.kind == "event" and not stop.group_stop
            if stop.kind == "signal" and stop.signo == signal.SIGSTOP and at_end:
                return continued
            if stop.kind == "event" and at_end:
                if self._pending(signal.SIGSTOP):
                    # A SIGCONT's trap came before the batch's own SIGSTOP was delivered: take
                    # that stop here, or the next injected call would pass it on as job control's.
                    t.cont(0)
                    continue
                return continued  # a trap or group-stop at the end (job control's SIGSTOP, passed on)
            if stop.kind == "event" or (stop.kind == "signal" and stop.signo == signal.SIGSTOP):
                t.cont(stop.signo if stop.kind == "signal" else 0)  # job control takes its course
                continue
            # All else is blocked, so this is a synchronous fault in the batch's code.
            raise TraceError(errno.EFAULT, f"a batch of remote syscalls in pid {t.pid} failed: {stop} at "
                                           f"{t.get_registers().rip:#x}")
