"""The source side: check, freeze, collect, write the image, then release or thaw.

freeze → collect → image: a process is held with PTRACE_SEIZE + PTRACE_INTERRUPT (no SIGSTOP
that it or its parent could see), looked at from /proc and from inside with a few injected
syscalls, and written as header, state, page batches and end.
"""
import os

from umig import image, procfs
from umig.errors import Refused, UmigError
from umig.ptrace import Tracee
from umig.state import credentials, files, memory, mm, registers, rseq, signals, task

SCRATCH_SIZE = 4096


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
        if procfs.namespace_id(pid, "mnt") != procfs.namespace_id("self", "mnt"):
            blockers.append(f"pid {pid} lives in another mount namespace: its paths mean something else here")
        return blockers + files.check(pid) + memory.check(pid)
    except UmigError as e:
        return [str(e)]


class Frozen:
    """A process held still by ptrace, with the means to look inside it: its registers as they
    were, injected syscalls, and a scratch page in its address space for their results."""

    def __init__(self, pid):
        self.pid = pid
        self.tracee = Tracee(pid)
        self.scratch = None

    def freeze(self):
        self.tracee.freeze()
        threads = int(procfs.status(self.pid)["Threads"])
        if threads > 1:  # it started a thread since it was checked
            self.tracee.detach()
            raise Refused(f"pid {self.pid} has {threads} threads (only single-threaded processes move yet)")
        self.registers = self.tracee.get_registers()
        self.xstate = self.tracee.get_xstate()
        self.blocked = self.tracee.get_sigmask()
        # Before any injected syscall: leaving the stop may clear the rseq critical-section pointer,
        # and a thread frozen inside a critical section must resume at its abort handler.
        self.rseq = rseq.dump(self)
        # Injected syscalls share one save of the registers and the mask, and one scratch page.
        self.session = self.tracee.syscall_session().__enter__()
        self.scratch = self.session.scratch(SCRATCH_SIZE)
        return self

    def syscall_checked(self, name, nr, *args):
        result = self.session.syscall(nr, *args)
        if -4096 < result < 0:
            raise UmigError(f"{name} run inside pid {self.pid} failed: {os.strerror(-result)}")
        return result

    def read(self, address, size):
        return self.tracee.read_memory(address, size)

    def thaw(self):
        """Let the process go on exactly as it was (the session unmaps the scratch page and puts
        back the registers and the mask, with the kernel's syscall restart applied)."""
        self.session.close()
        self.tracee.detach()

    def release(self):
        """The process lives elsewhere now: end this copy."""
        self.tracee.kill()


def refuse_blocked(pid):
    """Raise Refused naming the first blocker, before anything is frozen."""
    blockers = check(pid)
    if blockers:
        more = f" (and {len(blockers) - 1} more: see umig check {pid})" if len(blockers) > 1 else ""
        raise Refused(blockers[0] + more)


def freeze(pid):
    """Freeze a process that refuse_blocked() let through."""
    return Frozen(pid).freeze()


def collect(frozen):
    """The image's state section and the page runs to carry. The scratch page is left out: it
    exists only while umig looks."""
    pid = frozen.pid
    state = {
        "task": task.dump(frozen),
        "credentials": credentials.dump(frozen),
        "mm": mm.dump(frozen),
        "signals": signals.dump(frozen),
        "rseq": frozen.rseq,
        "registers": registers.dump(frozen),
        "files": files.dump(pid),
    }
    section, runs = memory.dump(pid, exclude=(frozen.scratch, frozen.scratch + SCRATCH_SIZE))
    state["memory"] = section
    state["pid"] = procfs.namespace_pid(pid)
    return state, runs


def write_image(writer, frozen, state, runs, after_state=None):
    """header, state, page batches, end. after_state runs between state and pages (migrate waits
    there for the target to accept)."""
    writer.write(image.header(state["pid"]))
    writer.write(image.Record("state", state))
    if after_state:
        after_state()
    for batch_runs, buffer in memory.read_batches(frozen.pid, runs):
        writer.write(image.Record("pages", {"runs": batch_runs}, buffer))
    writer.end()


def describe(state):
    """`umig show`: the image for humans, one block per kind of state."""
    lines = [f"process {state['pid']}"]
    lines += task.describe(state["task"]) + credentials.describe(state["credentials"])
    lines += registers.describe(state["registers"]) + rseq.describe(state["rseq"])
    lines += mm.describe(state["mm"]) + signals.describe(state["signals"])
    lines += files.describe(state["files"]) + memory.describe(state["memory"])
    return lines
