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
from umig.procfs import PAGE_SIZE
from umig.transport import Connection, is_loopback


def default_codec(endpoint):
    """No compression on loopback, where copying is cheaper than compressing; lz4 elsewhere."""
    return "none" if is_loopback(endpoint) else "lz4"


def migrate(pid, target, requested_pid_mode="keep", timeout=60.0, live=False, lazy=False, codec=None,
            tracking="userfaultfd", notice=lambda line: None):
    started = time.monotonic()
    dump.refuse_blocked(pid)
    connection = Connection(target, timeout)
    frozen = None
    try:
        connection.send_control("hello", pid=pid, pid_mode=requested_pid_mode, host=os.uname().nodename)
        welcome = connection.expect("welcome", "greeting")
        frozen = dump.freeze(pid)
        state, runs = dump.collect(frozen)
        writer = image.ImageWriter(connection.send_record, codec or default_codec(connection.endpoint))
        if live:
            extra = _precopy(frozen, state, runs, writer, connection, tracking, notice)
        elif lazy:
            lazy_runs = _postcopy_start(frozen, state, runs, writer, connection)
        else:
            dump.write_image(writer, frozen, state, runs,
                             after_state=lambda: connection.expect("accepted", "checking the image"))
        connection.expect("ready", "restoring")
        connection.send_control("commit")
        running = connection.expect("running", "resuming")
        resumed_at = time.monotonic()
        if lazy:
            postcopy.serve(pid, writer, connection, lazy_runs)
        frozen.release()
    except BaseException as e:
        try:
            if frozen is not None:
                frozen.thaw()  # first: the source must not wait on the network
        finally:
            try:
                connection.send_control("abort", reason=(str(e) or type(e).__name__)[:300])
            except UmigError:
                pass
        raise
    finally:
        connection.close()
    result = {"source_pid": pid, "target": connection.endpoint, "target_name": welcome.get("name"),
              "target_pid": running["target_pid"], "pages": writer.pages, "bytes": writer.bytes,
              "wire_bytes": writer.wire_bytes,
              "total_s": round(time.monotonic() - started, 6), "frozen_s": round(resumed_at - frozen.stopped_at, 6)}
    if lazy:
        result.update(mode="lazy", postcopy_s=round(time.monotonic() - resumed_at, 6))
    if live:
        # The process was also held while its first state was taken and the tracker armed.
        result.update(extra, mode="live", frozen_s=max(result["frozen_s"], extra["first_freeze_s"]))
    return result


def _postcopy_start(frozen, state, runs, writer, connection):
    """The lazy path up to the resume: the state and the pages userfaultfd cannot bring later.
    Returns the runs that follow once the process runs on the target."""
    eager, lazy_runs = postcopy.split(state, runs)
    dump.write_image(writer, frozen, dict(state, mode="lazy", lazy_runs=lazy_runs), eager,
                     after_state=lambda: connection.expect("accepted", "checking the image"),
                     last=image.Record("resume", {"pages": sum(length for _, length in lazy_runs) // PAGE_SIZE}),
                     # An eager page left out would be missing, and the restorer may touch it
                     # (the rseq area) before anyone serves faults.
                     drop_zero_pages=False)
    return lazy_runs


def _precopy(frozen, state, runs, writer, connection, tracking, notice):
    """The live path: first state, memory copied while the process runs, then the final state
    and what changed (the process frozen again). Returns the figures of the pre-copy."""
    writer.write(image.header(state["pid"]))
    writer.write(image.Record("state", dict(state, mode="live")))
    frozen.tracker = precopy.tracker(frozen, state["memory"], tracking, notice)
    frozen.run()
    first_freeze = time.monotonic() - frozen.stopped_at
    connection.expect("accepted", "checking the image")
    written, rounds, reason = precopy.copy_rounds(
        frozen, frozen.tracker, runs,
        lambda pid, round_runs: dump.write_pages(writer, pid, round_runs, observe=frozen.tracker.sent,
                                                 tolerant=True))
    tracker, frozen.tracker = frozen.tracker, None
    tracker.disarm()
    final, final_runs = dump.collect(frozen)
    send, discard = precopy.final_pages(state["memory"], final["memory"], written, final_runs, tracker.tracked,
                                        tracker.lost)
    writer.write(image.Record("state", dict(final, discard=discard)))
    dump.write_pages(writer, frozen.pid, send)
    writer.end()
    return {"first_freeze_s": round(first_freeze, 6), "rounds": rounds, "rounds_ended": reason,
            "tracking": tracker.method}
