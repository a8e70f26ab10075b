"""The target side: verify the image against this host, start the restorer, feed it the plan and
the pages as they arrive, and hold the rebuilt process stopped until the source commits.

restore → resume: the restorer rebuilds the process from inside (freestanding C, restorer/), one
command per step; at its last syscall, the munmap of its own code, the agent (its tracer) installs
the final registers, xsave state and signal mask, and lets it run only on commit.
"""
import os

from umig import postcopy, procfs
from umig.phases import Phases
from umig.ptrace import Registers, Tracee
from umig.restorer import Restorer
from umig.state import credentials, files, memory, mm, registers, rseq, signals, task

PTRACE_O_EXITKILL = 0x100000  # an agent that dies takes its half-restored processes with it


def pid_mode(requested, pid):
    """keep: take the image's PID (clone3 set_tid); ns: it is taken here, so keep it inside a new
    PID namespace (raise() and abort() signal the TID glibc remembers); any: whatever PID comes."""
    if requested == "any":
        return "any"
    return "ns" if os.path.exists(procfs.proc_path(pid)) else "keep"


def check_target(state, settled=True):
    """Refuse, before anything is started, what this host cannot rebuild, but memory
    (memory.check_target). The files a live or lazy migration's first state has open may still
    change: that state is not `settled`, the final state checks them whole."""
    mm.check_target(state["mm"])
    files.check_target(state["files"], settled)
    task.check_target(state["task"])


class RestoredProcess:
    """A rebuilt process held at its restorer's last syscall, waiting for resume() or discard()."""

    def __init__(self, restorer, tracee, state, phases, pager=None):
        self.restorer = restorer
        self.phases = phases  # the restore's steps; resume() adds its own
        self.tracee = tracee
        self.state = state
        self.pager = pager  # post-copy: the pages still to come (umig/postcopy.py)
        self.pid = restorer.pid            # as this host's initial PID namespace sees it
        self.init_pid = restorer.init_pid  # the PID namespace's init in "ns" mode, else None

    def resume(self):
        self.phases = Phases()
        if self.pager:
            # Still traced (and killed with the agent) until every page is in, with the children
            # it forks meanwhile.
            self.tracee.set_options(postcopy.FAMILY_OPTIONS)
            self.tracee.cont()
        else:
            self.tracee.detach()
        self.phases.mark("resume")

    def complete(self, session, records):
        """Post-copy: serve the process's missing pages until all have come, then let it go.
        Returns the process's end if it ended before all had come."""
        ended = self.pager.run(session, records, self.tracee)
        # Children of one that ended go on untraced too; one that ended as the last pages came
        # has completed its move all the same.
        released = self.pager.release(self.tracee)
        return ended or released

    def discard(self):
        if self.pager:
            self.pager.kill_children(self.tracee)
        self.restorer.kill()
        if self.pager:
            self.pager.close()


def restore(records, requested_pid_mode="keep", on_accept=None, on_sync=lambda: None):
    """Rebuild the process of an image (an iterator of verified records, umig/image.py);
    on_accept(header, state) is called once it is checked, on_sync() at each sync record.
    Returns a RestoredProcess, stopped; on any failure nothing it started is left behind."""
    header = next(records)
    state = next(records).meta
    phases = Phases()
    memory.forget_file_contents()
    settled = state.get("mode") not in ("live", "lazy")
    memory.check_target(state["memory"], settled=settled)
    check_target(state, settled)
    phases.mark("check")
    restorer = Restorer()
    restorer.start(pid_mode(requested_pid_mode, state["pid"]), state["pid"])
    pager = None
    try:
        tracee = Tracee(restorer.pid)
        tracee.seize(PTRACE_O_EXITKILL)
        tracee.interrupt()  # register sets are only readable at a stop
        registers.check_target(state["registers"], tracee.get_xstate())
        tracee.cont()
        phases.mark("start the restorer")
        # A frozen process's pages may come while the mappings are laid out (they wait in the
        # socket); one that runs on (live, lazy) is frozen again only once they are.
        accept_now = on_accept and state.get("mode") not in ("live", "lazy")
        if accept_now:
            on_accept(header.meta, state)
        restorer.close_fds(files.lowest_free_fd(state["files"]))
        hole = memory.prepare(restorer, state["memory"], procfs.maps(restorer.pid))
        pages = memory.PageWriter(restorer, state["memory"])
        phases.mark("lay out the mappings")
        try:
            if on_accept and not accept_now:
                on_accept(header.meta, state)
            for record in records:  # page batches, up to the verified end record
                if record.kind == "pages":
                    pages.write(record.meta["runs"], record.payload)
                elif record.kind == "sync":  # every page before it is in place
                    on_sync()
                elif record.kind == "layout":  # the final state's (live, lazy): now, then its last pages
                    phases.mark("until the final layout (pages sent while it ran)")
                    layout = record.meta
                    memory.check_target(layout["memory"], final=True)
                    memory.relayout(restorer, state["memory"], layout["memory"], layout["discard"], hole)
                    restorer.sync()  # the pages that follow go into the new layout
                    state = dict(state, memory=layout["memory"], lazy_runs=layout.get("lazy_runs"))
                    phases.mark("final layout")
                elif record.kind == "state":  # the rest of the final state
                    check_target(record.meta)
                    # Out of the way of descriptors the process opened since the first state.
                    restorer.close_fds(files.lowest_free_fd(record.meta["files"]))
                    state = dict(record.meta, memory=state["memory"], lazy_runs=state["lazy_runs"])
                    phases.mark("final state: check")
                elif record.kind == "resume":  # post-copy: the rest comes once the process runs
                    pages.close()  # its memory is registered anew, to be served
                    pager = postcopy.Pager(restorer, state["memory"], state["lazy_runs"])
                    break
        finally:
            pages.close()
        phases.mark("pages (arriving)")
        memory.finish(restorer, state["memory"])
        restorer.flush()  # the restorer sets the protections while the next steps are made
        mm.restore(restorer, state["mm"])
        files.restore(restorer, state["files"])
        task.restore(restorer, state["task"])
        signals.restore(restorer, state["signals"])
        rseq.restore(restorer, state["rseq"])
        credentials.restore(restorer, state["credentials"])
        restorer.finish()
        phases.mark("restorer steps")
        tracee.finish_restore(Registers.from_bytes(state["registers"]["gpr"]), state["registers"]["xstate"],
                              state["signals"]["blocked"])
        task.restore_from_outside(restorer.pid, state["task"])
        phases.mark("registers and the rest")
        return RestoredProcess(restorer, tracee, state, phases, pager)
    except BaseException:
        restorer.kill()
        if pager:
            pager.close()
        raise
