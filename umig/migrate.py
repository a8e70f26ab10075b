"""One migration, top to bottom: check → connect → freeze → collect → image → transfer →
(target: restore) → commit → resume on the target → release the source.

The source is released only after the target reports the process running. Until the commit any
failure — a refusal, a restore step, a lost connection, a dead agent, a timeout — thaws the source
exactly as it was. After the commit, a target that falls silent leaves the outcome unknown; the
source is then thawed too (a duplicate can be killed, a lost process cannot be brought back).
"""
import os
import time

from umig import dump, image, postcopy, precopy
from umig.errors import UmigError
from umig.phases import Phases
from umig.procfs import PAGE_SIZE
from umig.state import memory
from umig.transport import UNSENT_RECORDS, Connection, is_loopback


def default_codec(endpoint):
    """No compression on loopback, where copying is cheaper than compressing; lz4 elsewhere."""
    return "none" if is_loopback(endpoint) else "lz4"


def migrate(pid, target, requested_pid_mode="keep", timeout=60.0, live=False, lazy=False, codec=None,
            tracking="userfaultfd", notice=lambda line: None):
    started = time.monotonic()
    phases = Phases()
    memory.forget_file_contents()
    dump.refuse_blocked(pid)
    memory.identify_files(pid)
    connection = Connection(target, timeout)
    frozen = None
    try:
        connection.send_control("hello", pid=pid, pid_mode=requested_pid_mode, host=os.uname().nodename)
        welcome = connection.expect("welcome", "greeting")
        phases.mark("check and connect")
        frozen = dump.freeze(pid)
        phases.mark("freeze")
        state, runs = dump.collect(frozen)
        phases.mark("collect")
        writer = image.ImageWriter(connection.send_record, codec or default_codec(connection.endpoint),
                                   holds=UNSENT_RECORDS)
        if live:
            extra = _precopy(frozen, state, runs, writer, connection, tracking, notice, phases)
        elif lazy:
            lazy_runs, extra = _postcopy_start(frozen, state, writer, connection, phases, notice)
        else:
            dump.write_image(writer, frozen, state, runs,
                             after_state=lambda: connection.expect("accepted", "checking the image"))
            phases.mark("image")
        ready = connection.expect("ready", "restoring")
        phases.mark("target ready")
        connection.send_control("commit")
        running = connection.expect("running", "resuming")
        phases.mark("commit and resume")
        resumed_at = time.monotonic()
        if lazy:
            extra["postcopy_faults"] = postcopy.serve(pid, writer, connection, lazy_runs)
            phases.mark("post-copy")
        frozen.release()
    except BaseException as e:
        news = e
        if isinstance(e, ProcessLookupError) and frozen is not None and frozen.exited(wait=1.0):
            # Its memory read while it ran between the freezes (live, lazy), as it ended (its
            # memory goes first: it may not have ended quite yet).
            news = frozen.exited_meanwhile()
        try:
            if frozen is not None:
                frozen.thaw()  # first: the source must not wait on the network
        except UmigError as failed:
            # The first failure is the news; a thaw that failed after it is news too.
            raise UmigError(f"{news}; thawing the source failed then: {failed}") from e
        finally:
            try:
                connection.send_control("abort", reason=(str(news) or type(news).__name__)[:300])
            except UmigError:
                pass
        if news is e:
            raise
        raise news from e
    finally:
        connection.close()
    result = {"source_pid": pid, "target": connection.endpoint, "target_name": welcome.get("name"),
              "target_pid": running["target_pid"], "pages": writer.pages, "bytes": writer.bytes,
              "wire_bytes": writer.wire_bytes,
              "total_s": round(time.monotonic() - started, 6), "frozen_s": round(resumed_at - frozen.stopped_at, 6),
              "phases": {"source": phases.steps, "target": ready.get("steps", []) + running.get("steps", [])}}
    if live or lazy:
        # The process was also held while its first state was taken (and the tracker armed).
        result.update(extra, mode="live" if live else "lazy", frozen_s=max(result["frozen_s"], extra["first_freeze_s"]))
    if lazy:
        result.update(postcopy_s=round(time.monotonic() - resumed_at, 6))
    return result


def _first_state(frozen, state, writer, connection, phases, meanwhile=lambda: None):
    """Send the first state (live, lazy), let the process run on, and wait until the target has
    checked it and laid out the mappings (meanwhile() runs before that wait). Returns how long
    the first freeze took."""
    writer.write(image.header(state["pid"]))
    writer.write(image.Record("state", state))
    frozen.run()
    first_freeze = time.monotonic() - frozen.stopped_at
    phases.mark("first state sent")
    meanwhile()
    connection.expect("accepted", "checking the image")
    phases.mark("target prepared")
    return first_freeze


def _settle(writer, connection, phases, step):
    """Return once the target has placed every page sent so far: the freeze that follows then
    has the machine to itself, not a target still busy with them."""
    writer.write(image.Record("sync", {}))
    connection.expect("synced", "placing the pages sent")
    phases.mark(step)


def _postcopy_start(frozen, state, writer, connection, phases, notice):
    """The lazy path up to the resume. A first state lets the target check it, start the restorer
    and lay out the mappings while the process runs on; then, frozen again, the final state and
    the pages userfaultfd cannot bring later, and those the process wrote meanwhile: its working
    set, which it would fault on one by one right after the resume. Returns the runs that follow
    once the process runs on the target, and the figures of the first freeze."""
    try:
        frozen.tracker = precopy.WriteTracker(frozen, state["memory"], postcopy.tracked_kinds(state["memory"]))
    except UmigError as e:
        notice(f"{e}; the working set goes with the other pages")
    phases.mark("tracker armed")
    # Write-protecting takes milliseconds per GiB: done while the process runs. Its working set
    # is only a hint of what to send first; every page is read after the final freeze anyway.
    first_freeze = _first_state(frozen, dict(state, mode="lazy"), writer, connection, phases,
                                meanwhile=frozen.tracker.start if frozen.tracker else lambda: None)
    ahead = []
    if frozen.tracker:
        # What must arrive before the resume goes while the process still runs (the tracker is on
        # by now: what it writes from here is sent again), and the target places it meanwhile.
        # With them, the mappings around what it wrote so far (looked at, not reset: the working
        # set below is still all it writes from the first state on).
        try:
            present = memory.present_runs(frozen.pid, state["memory"]["mappings"])
        except UmigError:
            present = []  # it executed another program as it was looked at: the final freeze tells
        ahead = postcopy.split(state, present, postcopy.neighbourhoods(state, present,
                                                                       frozen.tracker.written(again=False)))[0]
        dump.write_pages(writer, frozen.pid, ahead, tolerant=True)
        _settle(writer, connection, phases, "eager pages ahead, until the target placed them")
    frozen.stop()
    working_set = frozen.tracker.written() if frozen.tracker else []
    # The layout and the pages that go before the resume first: the target places them while
    # the rest of the state is collected.
    layout, runs = dump.collect_memory(frozen)
    final = {"memory": layout, "rseq": frozen.rseq}
    # Pages sent ahead are eager still (only those written since go again: final_pages).
    eager, lazy_runs = postcopy.split(final, runs, memory.union(working_set, ahead))
    discard = []
    if frozen.tracker:
        eager, discard = precopy.final_pages(state["memory"], layout, working_set, eager,
                                             frozen.tracker.tracked, frozen.tracker.lost, ahead)
    writer.write(image.Record("layout", {"memory": layout, "discard": discard, "lazy_runs": lazy_runs}))
    # An eager page left out would be missing, and the restorer may touch it (the rseq area)
    # before anyone serves faults.
    dump.write_pages(writer, frozen.pid, eager)
    phases.mark("stop, final layout and eager pages")
    hidden_fds = frozen.tracker.fds if frozen.tracker else ()
    writer.write(image.Record("state", dump.collect_all_but_memory(frozen, hidden_fds)))
    writer.write(image.Record("resume", {"pages": sum(length for _, length in lazy_runs) // PAGE_SIZE}))
    phases.mark("final state")
    if frozen.tracker:
        # While the target restores: a source that must resume after all (post-copy lost, umig
        # gone) then keeps nothing of umig's.
        frozen.tracker, tracker = None, frozen.tracker
        tracker.disarm()
        phases.mark("tracker disarmed")
    return lazy_runs, {"first_freeze_s": round(first_freeze, 6),
                       # pages sent ahead that would have come on demand without the working set
                       "working_set_pages": sum(length for _, length in memory.intersect(
                           eager, postcopy.split(final, runs)[1])) // PAGE_SIZE}


def _precopy(frozen, state, runs, writer, connection, tracking, notice, phases):
    """The live path: first state, memory copied while the process runs, then the final state
    and what changed (the process frozen again). Returns the figures of the pre-copy."""
    frozen.tracker = precopy.tracker(frozen, state["memory"], tracking, notice)
    phases.mark("tracker armed")
    first_freeze = _first_state(frozen, dict(state, mode="live"), writer, connection, phases)
    sent = []  # every run a round sent: what the target may hold that the process has dropped since

    def send_round(pid, round_runs):
        sent.extend(round_runs)
        return dump.write_pages(writer, pid, round_runs, observe=frozen.tracker.sent, tolerant=True)

    written, rounds, reason = precopy.copy_rounds(
        frozen, frozen.tracker, runs, send_round,
        settle=lambda: _settle(writer, connection, phases, "rounds, until the target placed them"))
    phases.mark("stop and last scan")
    # The tracker stays armed: closing its userfaultfd write-unprotects every page, milliseconds
    # per GiB of the freeze, and a source released dies with it. Only a thaw disarms it.
    tracker = frozen.tracker
    # The layout and the last pages first: the target places them while the rest is collected.
    layout, final_runs = dump.collect_memory(frozen)
    send, discard = precopy.final_pages(state["memory"], layout, written, final_runs, tracker.tracked,
                                        tracker.lost, memory.union(sent, []))
    writer.write(image.Record("layout", {"memory": layout, "discard": discard}))
    dump.write_pages(writer, frozen.pid, send)
    phases.mark("final layout and pages")
    writer.write(image.Record("state", dump.collect_all_but_memory(frozen, tracker.fds)))
    writer.end()
    phases.mark("final state")
    return {"first_freeze_s": round(first_freeze, 6), "rounds": rounds, "rounds_ended": reason,
            "tracking": tracker.method}
