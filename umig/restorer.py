"""The agent's side of the restorer protocol (see restorer/protocol.h).

`Restorer` starts the freestanding `umig-restorer` binary, which becomes the process to restore,
and drives it one step at a time: one method per protocol command. Commands are pipelined: a
method sends its command and returns without waiting for the report; reports are collected as
they arrive, and the first failure is raised (as `RestoreStepError`) from whichever call notices
it, at the latest from `sync()` or `finish()`. After a failure the restorer's processes are gone.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterable, Mapping

from umig.errors import UmigError

SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)

RESTORER_PATH = Path(__file__).parent / "bin" / "umig-restorer"

PROTOCOL_VERSION = 2
MAX_PAYLOAD = 64 * 1024
OUTBOX_BYTES = 64 * 1024  # queued commands are sent once they reach this
# Commands sent and not yet reported, at most: their reports (16 bytes each) and the commands
# themselves stay well inside the channel's buffers, so neither side blocks the other.
MAX_UNREPORTED = 256
RELOCATE_STACK = 16 * 1024
PAGE_SIZE = 4096

MODES = ("keep", "ns", "any")


class Op(IntEnum):
    HELLO = 1
    READY = 2
    RELOCATE = 3
    CLOSE_FDS = 4
    UNMAP = 5
    MOVE = 6
    MAP = 7
    PROTECT = 9
    MM = 10
    OPEN_FD = 11
    CHDIR = 12
    UMASK = 13
    RLIMIT = 14
    PERSONALITY = 15
    COMM = 16
    SIGACTION = 17
    SIGALTSTACK = 18
    SIGQUEUE = 19
    RSEQ = 20
    TID_ADDRESS = 21
    CREDS = 22
    FINISH = 23
    VMA_NAME = 24
    CLONE = 25
    MADVISE = 26
    DUP = 27
    ITIMER = 28
    USERFAULTFD = 29
    CLOSE = 30


# The fixed parts of protocol.h's structs, by their C names.
LAYOUTS = {
    "umig_command": struct.Struct("<II"),
    "umig_report": struct.Struct("<IiQ"),
    "umig_range": struct.Struct("<QQ"),
    "umig_move": struct.Struct("<QQQ"),
    "umig_map": struct.Struct("<QQQIIII"),
    "umig_protect": struct.Struct("<QQII"),
    "umig_advice": struct.Struct("<QQII"),
    "umig_mm": struct.Struct("<11QII"),
    "umig_open_fd": struct.Struct("<iIQII"),
    "umig_dup": struct.Struct("<iiII"),
    "umig_itimer": struct.Struct("<II4Q"),
    "umig_rlimit": struct.Struct("<IIQQ"),
    "umig_sigaction": struct.Struct("<IIQQQQ"),
    "umig_sigaltstack": struct.Struct("<QiIQ"),
    "umig_sigqueue": struct.Struct("<II128s"),
    "umig_rseq": struct.Struct("<QIIII"),
    "umig_creds": struct.Struct("<10I"),
}
_COMMAND = LAYOUTS["umig_command"]
_REPORT = LAYOUTS["umig_report"]

MM_FIELDS = (
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
    "arg_start", "arg_end", "env_start", "env_end",
)

# How a failure report's detail reads, per step.
_AT_ADDRESS = {Op.RELOCATE, Op.UNMAP, Op.MOVE, Op.MAP, Op.PROTECT, Op.MADVISE, Op.USERFAULTFD, Op.SIGALTSTACK,
               Op.RSEQ, Op.TID_ADDRESS, Op.VMA_NAME}
_FOR_FD = {Op.CLOSE_FDS, Op.OPEN_FD, Op.DUP, Op.CLOSE}
_FOR_SIGNAL = {Op.SIGACTION, Op.SIGQUEUE}

# Known causes worth naming in the message.
_HINTS = {
    (Op.MM, errno.EBUSY): "; the exe link changes only once the old executable (the restorer's "
                          "own image) is unmapped",
    (Op.VMA_NAME, errno.EINVAL): "; a kernel without CONFIG_ANON_VMA_NAME cannot name mappings",
    (Op.RLIMIT, errno.EPERM): "; raising a hard limit above the agent's own needs CAP_SYS_RESOURCE, "
                              "which the agent lacks",
}

_WALL = 0x40000000  # waitpid's __WALL: whatever exit signal the child has


class RestorerError(UmigError):
    """The restorer could not be started or used."""


class RestoreStepError(RestorerError):
    """A step failed in the restorer, or the restorer died during it.

    `step` is the step's name ('map', 'clone', ...), `errno` the error number (None when the
    restorer died without saying why), `detail` the address, fd or signal it was working on.
    """

    def __init__(self, message: str, step: str, errno_: int | None = None, detail: int = 0):
        super().__init__(message)
        self.step = step
        self.errno = errno_
        self.detail = detail


@dataclass
class _Sent:
    """A command whose report has not arrived yet."""
    op: Op
    context: str = ""   # what the error message adds, such as the path


def _step_name(op: int) -> str:
    try:
        return Op(op).name.lower()
    except ValueError:
        return f"op {op}"


def _error_text(err: int) -> str:
    return f"{os.strerror(err)} ({errno.errorcode.get(err, f'errno {err}')})"


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"


RLIMIT_NAMES = {getattr(resource, name): name for name in dir(resource) if name.startswith("RLIMIT_")}


def _describe_detail(op: int, detail: int) -> str:
    if op in _AT_ADDRESS:
        return f" at {detail:#x}"
    if op in _FOR_FD:
        return f" for fd {detail}"
    if op in _FOR_SIGNAL:
        return f" for signal {detail} ({_signal_name(detail)})"
    if op == Op.RLIMIT:
        return f" for {RLIMIT_NAMES.get(detail, f'resource {detail}')}"
    if op == Op.CREDS:
        return f" for uid {detail}"
    return ""


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {_signal_name(os.WTERMSIG(status))}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"


def take_fd(pid: int, fd: int, pidfd: int | None = None) -> int:
    """A copy of process pid's descriptor fd, as one of ours (pidfd_getfd), through `pidfd` if
    one is held on it (then the process it names, whatever has the pid now)."""
    own = pidfd is None
    if own:
        pidfd = os.pidfd_open(pid)
    try:
        taken = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        err = ctypes.get_errno()
    finally:
        if own:
            os.close(pidfd)
    if taken < 0:
        raise RestorerError(f"pidfd_getfd of fd {fd} of pid {pid} failed: {os.strerror(err)}")
    return taken


class Restorer:
    """One restorer process tree: the launcher, the namespace init ("ns" mode), the child.

    Use it as a context manager to kill everything on the way out unless `finish()` handed the
    child over.
    """

    def __init__(self, binary: str | os.PathLike | None = None, timeout: float = 30.0):
        self.binary = Path(binary) if binary is not None else RESTORER_PATH
        self.timeout = timeout  # longest wait for a report before the restorer counts as hung
        self.mode: str | None = None
        self.launcher_child_pid: int | None = None
        self.pid: int | None = None
        self.init_pid: int | None = None
        self.image_size = 0
        self.remote_channel_fd: int | None = None  # the channel's fd in the child
        self.remote_userfaultfd: int | None = None  # reported by the USERFAULTFD step
        self.exit_status: int | None = None  # wait status of the child, or the init in "ns" mode
        self.finished = False
        self._reaped = False
        self._sock: socket.socket | None = None
        self._launcher: subprocess.Popen | None = None
        self._sent: deque[_Sent] = deque()
        self._last_step: Op | None = None
        self._rx = bytearray()
        self._queued: list[_Sent] = []  # commands not sent yet, and their bytes
        self._outbox = bytearray()

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.kill()
        self._close()

    @property
    def hole_size(self) -> int:
        """The smallest length RELOCATE accepts."""
        return -(-self.image_size // PAGE_SIZE) * PAGE_SIZE + RELOCATE_STACK

    # ---- start-up -----------------------------------------------------------------------------

    def start(self, mode: str, pid: int = 0) -> None:
        """Starts the restorer and waits until the restoring child is ready."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode != "any" and pid <= 0:
            raise ValueError(f"mode {mode!r} needs the PID to restore, not {pid}")
        if self._sock is not None:
            raise RestorerError("this restorer was already started")
        if not self.binary.is_file():
            raise RestorerError(f"restorer binary not built: run make (missing {self.binary})")
        self.mode = mode
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        try:
            self._launcher = subprocess.Popen(
                [str(self.binary), str(theirs.fileno()), mode, str(pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),))
        except BaseException:
            self._close()
            raise
        finally:
            theirs.close()
        try:
            self._await_start(mode, pid)
        except BaseException:
            self.kill()
            raise

    def _await_start(self, mode: str, pid: int) -> None:
        # HELLO (from the launcher) and READY or CLONE (from the child or init) may come in either
        # order. A failed clone is raised only once HELLO has named the init, so kill() reaps it.
        hello = ready = clone_failure = None
        while hello is None or (ready is None and clone_failure is None):
            report = self._read_report()
            if report is None:
                status = self._launcher.wait()
                raise RestorerError(f"the restorer ({self.binary}) died before it was ready "
                                    f"(launcher exit status {status})")
            op, error, detail = report
            if op == Op.HELLO:
                hello = detail
                # From here on kill() reaches the child or init even if READY never comes.
                self.launcher_child_pid = detail
                if mode == "ns":
                    self.init_pid = detail
                else:
                    self.pid = detail
            elif op == Op.READY and error == 0:
                ready = detail
            elif op == Op.CLONE:
                what = f"PID {detail}" if mode != "any" else "a process"
                clone_failure = RestoreStepError(
                    f"clone3 could not create {what} for the restore (mode {mode}): "
                    f"{_error_text(-error)}", "clone", -error, detail)
                if hello is None and self._launcher.wait() != 0:
                    break  # the launcher's own clone3 failed: no HELLO will come
            else:
                raise RestoreStepError(
                    f"the restorer failed to start: report {_step_name(op)} error "
                    f"{_error_text(-error) if error else 0}", _step_name(op),
                    -error if error else None, detail)
        if clone_failure:
            raise clone_failure
        self._launcher.wait()
        self.image_size = ready
        if mode == "ns":
            self.pid = self._only_child_of(self.init_pid)

    @staticmethod
    def _only_child_of(pid: int) -> int:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) != 1:
            raise RestorerError(f"the namespace init {pid} has children {children}, expected one")
        return int(children[0])

    # ---- the channel --------------------------------------------------------------------------

    def _read_report(self) -> tuple[int, int, int] | None:
        """The next report, waiting up to the timeout for it; None at end of file."""
        while len(self._rx) < _REPORT.size:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(self.timeout * 1000):
                step = _step_name(self._sent[0].op) if self._sent else self._last_step_name()
                self.kill()
                raise RestoreStepError(
                    f"restore step '{step}' failed: no report from the restorer within "
                    f"{self.timeout:g} s (it was killed)", step)
            try:
                data = self._sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self._rx += data
        report = _REPORT.unpack_from(self._rx)
        del self._rx[:_REPORT.size]
        return report

    def _poll(self) -> None:
        """Handles every report that has already arrived, without waiting."""
        eof = False
        while not eof:
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            eof = not data
            self._rx += data
        while len(self._rx) >= _REPORT.size:
            report = _REPORT.unpack_from(self._rx)
            del self._rx[:_REPORT.size]
            self._handle(*report)
        if eof:
            self._died()

    def _wait_report(self) -> None:
        """Waits for the next report and handles it."""
        report = self._read_report()
        if report is None:
            self._died()
        self._handle(*report)

    def _handle(self, op: int, error: int, detail: int) -> None:
        if error == 0:
            if not self._sent or self._sent[0].op != op:
                self._desync(op)
            self._sent.popleft()
            if op == Op.CLOSE_FDS:
                self.remote_channel_fd = detail
            elif op == Op.USERFAULTFD:
                self.remote_userfaultfd = detail
            return
        # The restorer stops at its first failure: every command before it succeeded.
        while self._sent and self._sent[0].op != op:
            self._sent.popleft()
        if not self._sent:
            self._desync(op)
        failed = self._sent.popleft()
        self._end_after_failure()
        context = f" ({failed.context})" if failed.context else ""
        step = _step_name(op)
        raise RestoreStepError(
            f"restore step '{step}' failed{_describe_detail(op, detail)}{context}: "
            f"{_error_text(-error)}{_HINTS.get((op, -error), '')}", step, -error, detail)

    def _desync(self, op: int) -> None:
        self.kill()
        expected = _step_name(self._sent[0].op) if self._sent else "none"
        raise RestorerError(f"protocol out of step: report for '{_step_name(op)}', "
                            f"expected '{expected}'")

    def _died(self) -> None:
        """The channel closed without a failure report."""
        pending = self._sent[0] if self._sent else None
        last = self._last_step_name()
        self._end_after_failure()
        how = ""
        status = self.exit_status
        if status is not None:
            how = f" ({_describe_status(status)})"
            if self.mode == "ns" and os.WIFEXITED(status) and os.WEXITSTATUS(status) > 128:
                how = f" (killed by {_signal_name(os.WEXITSTATUS(status) - 128)})"
        if pending is None:
            raise RestoreStepError(f"the restorer died after step '{last}'{how}", last)
        # It died in the first step not yet confirmed.
        step = _step_name(pending.op)
        context = f" ({pending.context})" if pending.context else ""
        also = f"; steps sent up to '{last}'" if last != step else ""
        raise RestoreStepError(f"restore step '{step}' failed{context}: the restorer died "
                               f"without a report{how}{also}", step)

    def _last_step_name(self) -> str:
        return _step_name(self._last_step) if self._last_step is not None else "start"

    def _end_after_failure(self) -> None:
        """The restorer exits by itself after a failure: give it a moment to, so that its exit
        status (and in "ns" mode the init's) is its own, then make sure."""
        deadline = time.monotonic() + 1.0
        while not self._reap_now() and time.monotonic() < deadline:
            time.sleep(0.002)
        self.kill()

    def _send(self, op: Op, payload: bytes = b"", *, context: str = "") -> None:
        """Queue a command; queued commands go out together before any wait for a report (a
        write and a poll for each of the fifty-odd final steps were about half their time)."""
        if self._sock is None or self.finished:
            raise RestorerError("the restorer is not running (not started, finished or killed)")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"'{_step_name(op)}' payload of {len(payload)} bytes exceeds "
                             f"{MAX_PAYLOAD}")
        self._queued.append(_Sent(op, context))
        self._outbox += _COMMAND.pack(op, len(payload)) + payload
        if len(self._outbox) >= OUTBOX_BYTES or len(self._queued) >= MAX_UNREPORTED:
            self.flush()

    def flush(self) -> None:
        """Send the queued commands without waiting for their reports. First the reports already
        in: a restorer that died meanwhile is reported after its last step, not at a step it was
        never sent."""
        if not self._queued:
            return
        self._poll()
        # The restorer stops reading commands while its reports wait to be read: with more sent
        # and unreported than this, both sides could wait for the other for ever.
        while self._sent and len(self._sent) + len(self._queued) > MAX_UNREPORTED:
            self._wait_report()
        commands, self._outbox = self._outbox, bytearray()
        self._sent.extend(self._queued)
        self._last_step = self._queued[-1].op
        self._queued.clear()
        try:
            self._sock.sendall(commands, socket.MSG_NOSIGNAL)
            return
        except (BrokenPipeError, ConnectionResetError):
            pass
        # It failed or died: its last report, if any, is still queued for us.
        while True:
            self._wait_report()

    def sync(self) -> None:
        """Sends the queued commands and waits for the reports of every command so far."""
        self.flush()
        while self._sent:
            self._wait_report()

    # ---- the steps ----------------------------------------------------------------------------

    def relocate(self, start: int, length: int) -> None:
        """Moves the restorer into the hole [start, start+length) (at least `hole_size`)."""
        self._send(Op.RELOCATE, LAYOUTS["umig_range"].pack(start, length))

    def close_fds(self, lowest: int) -> None:
        """Moves the channel to an fd >= lowest and closes every other fd."""
        self._send(Op.CLOSE_FDS, struct.pack("<I", lowest))

    def unmap(self, start: int, length: int) -> None:
        self._send(Op.UNMAP, LAYOUTS["umig_range"].pack(start, length))

    def move(self, frm: int, to: int, length: int) -> None:
        self._send(Op.MOVE, LAYOUTS["umig_move"].pack(frm, to, length),
                   context=f"to {to:#x}")

    def map(self, start: int, length: int, offset: int = 0, prot: int = 0,
            flags: int = mmap.MAP_PRIVATE, open_flags: int = os.O_RDONLY,
            path: str | bytes | os.PathLike | None = None) -> None:
        """mmap exactly at start; without a path the mapping is anonymous (MAP_ANONYMOUS is
        added)."""
        if path is None:
            flags |= mmap.MAP_ANONYMOUS
            raw = b""
        elif flags & mmap.MAP_ANONYMOUS:
            raise ValueError("a MAP_ANONYMOUS mapping has no path")
        else:
            raw = os.fsencode(path)
        self._send(Op.MAP, LAYOUTS["umig_map"].pack(start, length, offset, prot, flags,
                                                      open_flags, len(raw)) + raw,
                   context=os.fsdecode(raw))

    def protect(self, start: int, length: int, prot: int) -> None:
        self._send(Op.PROTECT, LAYOUTS["umig_protect"].pack(start, length, prot, 0))

    def madvise(self, start: int, length: int, advice: int) -> None:
        self._send(Op.MADVISE, LAYOUTS["umig_advice"].pack(start, length, advice, 0))

    def mm(self, fields: Mapping[str, int] | None = None, auxv: bytes = b"",
           exe: str | bytes | os.PathLike | None = None, **kwargs: int) -> None:
        """prctl(PR_SET_MM_MAP): fields (dict and/or keywords) are MM_FIELDS; auxv is the raw
        vector (u64 pairs); exe None keeps the current /proc/PID/exe."""
        values = {**(fields or {}), **kwargs}
        missing = [name for name in MM_FIELDS if name not in values]
        unknown = sorted(set(values) - set(MM_FIELDS))
        if missing or unknown:
            raise ValueError(f"mm fields: missing {missing}, unknown {unknown}")
        raw = os.fsencode(exe) if exe is not None else b""
        self._send(Op.MM, LAYOUTS["umig_mm"].pack(*(values[name] for name in MM_FIELDS),
                                                    len(auxv), len(raw)) + bytes(auxv) + raw,
                   context=f"exe {os.fsdecode(raw)}" if raw else "")

    def open_fd(self, fd: int, flags: int, offset: int, seek: bool,
                path: str | bytes | os.PathLike) -> None:
        """Opens path as fd with flags as fdinfo shows them; seek: lseek to offset."""
        raw = os.fsencode(path)
        self._send(Op.OPEN_FD, LAYOUTS["umig_open_fd"].pack(fd, flags, offset, int(seek),
                                                              len(raw)) + raw,
                   context=os.fsdecode(raw))

    def dup(self, source_fd: int, fd: int, cloexec: bool) -> None:
        """Makes fd another descriptor of source_fd's open file (shared offset and flags)."""
        self._send(Op.DUP, LAYOUTS["umig_dup"].pack(source_fd, fd, int(cloexec), 0))

    def itimer(self, which: int, interval: tuple[int, int], value: tuple[int, int]) -> None:
        """Arms timer `which` (ITIMER_*) with (seconds, microseconds) pairs, as setitimer takes them."""
        self._send(Op.ITIMER, LAYOUTS["umig_itimer"].pack(which, 0, *interval, *value))

    def userfaultfd(self, features: int) -> int:
        """Creates a userfaultfd (UFFD_FEATURE_* `features`) in the process and returns it as an fd
        of the caller's (who registers ranges with it, fills and serves them); the restorer's
        copy is closed."""
        self._send(Op.USERFAULTFD, struct.pack("<Q", features))
        self.sync()
        fd = take_fd(self.pid, self.remote_userfaultfd)
        try:
            self.close(self.remote_userfaultfd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self, fd: int) -> None:
        self._send(Op.CLOSE, struct.pack("<i", fd))

    def chdir(self, path: str | bytes | os.PathLike) -> None:
        raw = os.fsencode(path)
        self._send(Op.CHDIR, raw, context=os.fsdecode(raw))

    def umask(self, mask: int) -> None:
        self._send(Op.UMASK, struct.pack("<I", mask))

    def rlimit(self, resource: int, cur: int, max: int) -> None:
        """cur/max as the kernel has them (RLIM_INFINITY is 2**64-1)."""
        self._send(Op.RLIMIT, LAYOUTS["umig_rlimit"].pack(resource, 0, cur & (2**64 - 1),
                                                            max & (2**64 - 1)))

    def personality(self, persona: int) -> None:
        self._send(Op.PERSONALITY, struct.pack("<Q", persona))

    def comm(self, name: str | bytes) -> None:
        raw = name.encode() if isinstance(name, str) else bytes(name)
        self._send(Op.COMM, raw[:15].ljust(16, b"\0"), context=repr(raw))

    def sigaction(self, signo: int, handler: int, flags: int, restorer: int, mask: int) -> None:
        """The kernel's view: handler 0 is SIG_DFL, 1 SIG_IGN; flags include SA_RESTORER."""
        self._send(Op.SIGACTION,
                   LAYOUTS["umig_sigaction"].pack(signo, 0, handler, flags, restorer, mask))

    def sigaltstack(self, sp: int, flags: int, size: int) -> None:
        self._send(Op.SIGALTSTACK, LAYOUTS["umig_sigaltstack"].pack(sp, flags, 0, size))

    def sigqueue(self, signo: int, shared: bool, info: bytes) -> None:
        """Queues a pending signal; info is the 128-byte siginfo from PTRACE_PEEKSIGINFO."""
        if len(info) > 128:
            raise ValueError("siginfo is 128 bytes")
        self._send(Op.SIGQUEUE, LAYOUTS["umig_sigqueue"].pack(signo, int(shared), bytes(info)))

    def rseq(self, address: int, length: int, flags: int, signature: int) -> None:
        self._send(Op.RSEQ, LAYOUTS["umig_rseq"].pack(address, length, flags, signature, 0))

    def tid_address(self, address: int) -> None:
        self._send(Op.TID_ADDRESS, struct.pack("<Q", address))

    def creds(self, uids: Iterable[int], gids: Iterable[int], groups: Iterable[int] = (),
              dumpable: bool = False) -> None:
        """uids and gids as /proc/PID/status lists them: (real, effective, saved, fs). Send it
        last before finish(): without privileges, later steps may fail."""
        uids, gids, groups = tuple(uids), tuple(gids), tuple(groups)
        if len(uids) != 4 or len(gids) != 4:
            raise ValueError("uids and gids are (real, effective, saved, fs)")
        self._send(Op.CREDS, LAYOUTS["umig_creds"].pack(*uids, *gids, len(groups),
                                                          int(dumpable))
                   + struct.pack(f"<{len(groups)}I", *groups))

    def vma_name(self, start: int, length: int, name: str | bytes) -> None:
        """Names an anonymous mapping ([anon:name]); an empty name clears it."""
        raw = name.encode() if isinstance(name, str) else bytes(name)
        self._send(Op.VMA_NAME, LAYOUTS["umig_range"].pack(start, length) + raw,
                   context=repr(raw))

    def finish(self) -> None:
        """Last step: the child reports, stops itself with SIGSTOP (a tracer must hold it by
        then) and, once resumed, unmaps the hole. Waits for every outstanding report."""
        self._send(Op.FINISH)
        self.sync()
        self.finished = True
        self._close()

    # ---- ending -------------------------------------------------------------------------------

    def kill(self) -> None:
        """Kills and reaps what is left: launcher, child and (in "ns" mode) init."""
        if self._launcher is not None and self._launcher.returncode is None:
            self._launcher.kill()
            self._launcher.wait()
        target = self._reap_target()
        if target is not None and not self._reaped:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.mode == "ns":
                # Polled: a traced restoring child may need us to wait for it meanwhile.
                deadline = time.monotonic() + self.timeout
                while not self._reap_now():
                    if time.monotonic() > deadline:
                        self._close()
                        raise RestorerError(
                            f"the namespace init {target} did not exit within {self.timeout:g} s "
                            f"of SIGKILL (is a process of its namespace traced by another?)")
                    time.sleep(0.001)
            else:
                self._reap(target, 0)
        self._close()

    def wait(self) -> int:
        """Waits until the restored process (in "ns" mode: its init) exits and returns its exit
        code, or -signal if it was killed. For after finish() and the hand-off."""
        target = self._reap_target()
        if target is None:
            raise RestorerError("the restorer was never started")
        if not self._reaped:
            self._reap(target, 0)
        if self.exit_status is None:
            raise RestorerError(f"process {target} was reaped by someone else")
        return os.waitstatus_to_exitcode(self.exit_status)

    def _reap_target(self) -> int | None:
        """Our own child: the init's death takes its namespace along; in "ns" mode the restoring
        child is the init's."""
        return self.init_pid if self.mode == "ns" else self.pid

    def _reap_now(self) -> bool:
        """Reaps our child if it has exited, without waiting; True once it is reaped."""
        target = self._reap_target()
        if target is None or self._reaped:
            return True
        if self.mode == "ns" and self.pid is not None:
            self._release_traced_child()
        return self._reap(target, os.WNOHANG)

    def _release_traced_child(self) -> None:
        """A traced child's zombie goes to its parent, the init, only once its tracer has waited
        for it, and the init cannot end before that. If we are the tracer, wait for it."""
        try:
            tracer = Path(f"/proc/{self.pid}/status").read_text().split("TracerPid:")[1].split()[0]
            # the tracer is a thread, and any thread of its process may wait for the tracee
            if tracer in os.listdir("/proc/self/task"):
                os.waitpid(self.pid, os.WNOHANG | _WALL)
        except (OSError, IndexError, ValueError):
            pass

    def _reap(self, pid: int, options: int) -> bool:
        """Waits for pid to exit (skipping the ptrace stops a tracing parent sees too)."""
        while True:
            try:
                found, status = os.waitpid(pid, options | _WALL)
            except ChildProcessError:
                self._reaped = True
                return True
            if found == 0:
                return False
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.exit_status = status
                self._reaped = True
                return True

    def _close(self) -> None:
        self._queued.clear()
        self._outbox.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
