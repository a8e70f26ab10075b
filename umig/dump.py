"""The source side: check, freeze, collect, write the image, then release or thaw.

freeze → collect → image: a process is held with PTRACE_SEIZE + PTRACE_INTERRUPT (no SIGSTOP
that it or its parent could see), looked at from /proc and from inside with a few injected
syscalls, and written as header, state, page batches and end.
"""
import contextlib
import os
import select
import time

from umig import image, procfs
from umig.errors import Refused, UmigError
from umig.ptrace import Call, Tracee
from umig.state import credentials, files, memory, mm, registers, rseq, signals, task

# Room for a batch asking about every signal and the rest (ptrace.SyscallSession.run_batch).
SCRATCH_SIZE = 16 * 1024


def check(pid):
    """Everything that would block migrating pid, as one-line reasons (empty: it can move)."""
    if not os.path.isdir(procfs.proc_path(pid)):
        return [f"no process with pid {pid}"]
    try:
        if pid == os.getpid():
            return [f"pid {pid} is umig itself"]
        if procfs.is_kernel_thread(pid):
            return [f"pid {pid} is a kernel thread"]
        status = procfs.status(pid)
        blockers = []
        state = status["State"].split()[0]
        if state in ("Z", "X"):
            return [f"pid {pid} has exited (state {status['State']})"]
        if int(status["Threads"]) > 1:
            blockers.append(f"pid {pid} has {status['Threads']} threads (only single-threaded processes move yet)")
        if int(status["TracerPid"]):
            blockers.append(f"pid {pid} is already traced by pid {status['TracerPid']}")
        kids = procfs.children(pid)
        if kids:
            blockers.append(f"pid {pid} has children ({', '.join(map(str, kids))}), which do not move yet")
        root, ours = os.stat(procfs.proc_path(pid, "root")), os.stat("/")
        if (root.st_dev, root.st_ino) != (ours.st_dev, ours.st_ino):
            blockers.append(f"pid {pid} has another root directory (chroot or container): its paths mean something else here")
        return blockers + task.check(pid) + credentials.check(pid) + files.check(pid) + memory.check(pid)
    except UmigError as e:
        return [str(e)]
    except FileNotFoundError:
        return [f"pid {pid} exited while it was being checked"]


class Frozen:
    """A process held still by ptrace, with the means to look inside it: its registers as they
    were, injected syscalls, and a scratch page in its address space for their results."""

    def __init__(self, pid):
        self.pid = pid
        self.tracee = Tracee(pid)
        self.session = self.tracker = None
        self._pidfd = None  # the process itself, opened at the first freeze: its pid may be reused

    def _seize(self):
        """Trace it (again, after run()): the process first frozen, not one that took its pid
        after it exited while it ran untraced."""
        if self._pidfd is not None and self.exited():
            raise self.exited_meanwhile()
        try:
            self.tracee.seize()
        except UmigError as e:
            # The kernel refuses to trace a process that is exiting (EPERM, not ESRCH): say so.
            if _exited(self.pid):
                raise Refused(f"pid {self.pid} exited before umig could freeze it") from None
            tracer = _tracer(self.pid)
            if tracer:
                raise Refused(f"pid {self.pid} is traced by pid {tracer} (a debugger?), which took it while "
                              "umig copied it") from None
            raise e
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.pid)
        elif self.exited():
            self.tracee.detach()
            raise self.exited_meanwhile()

    def exited_meanwhile(self):
        """The refusal for a process that exited between its first freeze and now."""
        return Refused(f"pid {self.pid} exited while umig copied it")

    def exited(self, wait=0.0):
        """Whether the process first frozen has exited (its pidfd turns readable then), waiting
        up to `wait` seconds for one that is on its way out."""
        if self._pidfd is None:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def stop(self):
        """Hold it still and take its CPU state (again, after run())."""
        self.stopped_at = time.monotonic()  # where its frozen time begins
        self._seize()
        stop = self.tracee.interrupt()
        try:
            if stop.group_stop:
                raise Refused(f"pid {self.pid} is stopped (job control): continue it first")
            # It may have started a thread or a child since it was checked.
            # Read once for the whole stop: what the state's sections take from it (credentials,
            # umask, handled signals, page tables, PIDs) cannot change while the process is held.
            self.status = procfs.status(self.pid)
            threads, children = int(self.status["Threads"]), procfs.children(self.pid)
            if threads > 1 or children:
                raise Refused(f"pid {self.pid} started {'a thread' if threads > 1 else 'a child'} while umig "
                              "prepared to freeze it")
            self.registers = self.tracee.get_registers()
            self.xstate = self.tracee.get_xstate()
            self.blocked = self.tracee.get_sigmask()
            # Before any injected syscall: leaving the stop may clear the rseq critical-section
            # pointer. A thread frozen inside a critical section goes to its abort handler, here as
            # the kernel would send it, and so in the image.
            self.rseq = rseq.dump(self)
            if self.registers != self.tracee.get_registers():
                self.tracee.set_registers(self.registers)
        except BaseException:
            self.thaw()
            raise
        return self

    def run(self):
        """Let it run on, untraced, until stop() (live migration copies memory meanwhile): a
        signal that comes to a traced process holds it in a signal-delivery-stop until its tracer
        looks, which umig does only at the next stop. It may start a thread or a child
        meanwhile, exit, be stopped by job control or traced by another: stop() refuses to go on
        then."""
        self.tracee.detach()

    @contextlib.contextmanager
    def inside(self):
        """A spell of injected syscalls sharing one save of the registers and the mask; the
        syscalls ask()ed for run together at its end, from a scratch area. Kept short: should umig
        die meanwhile, the process would resume with umig's registers; outside it, a dead tracer
        leaves the process as it was."""
        with self.tracee.syscall_session() as self.session:
            self._asked = []
            yield
            if self._asked:
                self.run_batch(self._asked)
            for call in self._asked:
                self._check(call.name, call.result)
        self.session = None

    def run_batch(self, calls):
        """Run these ptrace.Calls now, together; each holds its result then. The scratch area they
        run from is made for the first batch of a spell: one of single syscalls (closing the
        write tracker) does without the two injected calls that map and unmap it."""
        self.session.scratch(SCRATCH_SIZE)
        self.session.run_batch(calls)

    def ask(self, name, nr, *args):
        """A syscall the process runs at the end of this spell inside, with the others asked for
        (ptrace.Buffer arguments carry data in and out); its Call has the result then, and a
        failure is raised naming it."""
        call = Call(name, nr, *args)
        self._asked.append(call)
        return call

    def syscall_checked(self, name, nr, *args):
        return self._check(name, self.session.syscall(nr, *args))

    def _check(self, name, result):
        if -4096 < result < 0:
            raise UmigError(f"{name} run inside pid {self.pid} failed: {os.strerror(-result)}")
        return result

    def read(self, address, size):
        return self.tracee.read_memory(address, size)

    def thaw(self):
        """Let the process go on exactly as it was: without the write tracker, if it had one."""
        try:
            if self.tracker is not None:
                self.tracker, tracker = None, self.tracker
                if not self.tracee.attached and tracker.fds:
                    try:
                        self._seize()
                    except Refused:
                        # Exited (its userfaultfd went with it) or traced by another, which holds
                        # it: its registrations are undone from outside then.
                        tracker.abandon(self._pidfd)
                        return
                if self.tracee.attached:
                    self.tracee.interrupt()
                tracker.disarm()
        finally:
            self.tracee.detach()
            self._close_pidfd()

    def release(self):
        """The process lives elsewhere now: end this copy (with its write tracker, if armed)."""
        self.tracee.kill()
        if self.tracker is not None:
            self.tracker.forget()
        self._close_pidfd()

    def _close_pidfd(self):
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _tracer(pid):
    """The pid tracing pid, or 0."""
    try:
        return int(procfs.status(pid)["TracerPid"])
    except UmigError:
        return 0


def _exited(pid):
    """Whether pid is gone or a zombie."""
    try:
        return procfs.status(pid)["State"].split()[0] in ("Z", "X")
    except UmigError:
        return True


def refuse_blocked(pid):
    """Raise Refused naming the first blocker, before anything is frozen."""
    blockers = check(pid)
    if blockers:
        more = f" (and {len(blockers) - 1} more: see umig check {pid})" if len(blockers) > 1 else ""
        raise Refused(blockers[0] + more)


def freeze(pid):
    """Freeze a process that refuse_blocked() let through."""
    return Frozen(pid).stop()


def collect(frozen, hidden_fds=()):
    """The image's state section and the page runs to carry; `hidden_fds` are umig's own,
    left in the process (the live write tracker's userfaultfd) and not part of it."""
    # Before the scratch area of the questions is there: memory is exactly the process's own.
    section, runs = collect_memory(frozen)
    return dict(collect_all_but_memory(frozen, hidden_fds), memory=section), runs


def collect_memory(frozen):
    """The memory section and the page runs to carry. A live or lazy move's final freeze sends
    them, and the target lays them out, while the rest is collected."""
    return memory.dump(frozen.pid, frozen.status)


def collect_all_but_memory(frozen, hidden_fds=()):
    # Each of these asks the process its questions, then makes its section of the answers.
    with frozen.inside():
        asked = {"task": task.dump(frozen), "credentials": credentials.dump(frozen), "mm": mm.dump(frozen),
                 "signals": signals.dump(frozen)}
    state = {name: section() for name, section in asked.items()}
    state.update(pid=procfs.namespace_pid(frozen.status), rseq=frozen.rseq, registers=registers.dump(frozen),
                 files=files.dump(frozen.pid, hidden_fds))
    return state


def write_image(writer, frozen, state, runs, after_state=None):
    """header, state, page batches (all-zero pages of fresh memory left out), end. after_state
    runs between state and pages (migrate waits there for the target to accept)."""
    writer.write(image.header(state["pid"]))
    writer.write(image.Record("state", state))
    if after_state:
        after_state()
    write_pages(writer, frozen.pid, runs, memory.spans(state["memory"], memory.FRESH_KINDS))
    writer.end()


def write_pages(writer, pid, runs, zero_spans=(), observe=None, tolerant=False):
    """Page records for runs, read in batches (all-zero pages in zero_spans left out; observe, if
    given, sees each batch as sent; tolerant: pages gone meanwhile skipped, for a process that
    runs); returns the bytes written."""
    sent = 0
    for batch_runs, buffer in memory.read_batches(pid, runs, zero_spans=zero_spans, tolerant=tolerant,
                                                  ring=writer.holds + 1):
        writer.write(image.Record("pages", {"runs": batch_runs}, buffer))
        if observe:
            observe(batch_runs, buffer)
        sent += len(buffer)
    return sent


def describe(state):
    """`umig show`: the image for humans, one block per kind of state."""
    lines = [f"process {state['pid']}"]
    lines += task.describe(state["task"]) + credentials.describe(state["credentials"])
    lines += registers.describe(state["registers"]) + rseq.describe(state["rseq"])
    lines += mm.describe(state["mm"]) + signals.describe(state["signals"])
    lines += files.describe(state["files"]) + memory.describe(state["memory"])
    return lines
