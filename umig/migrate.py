"""One migration, top to bottom: check → connect → freeze → collect → image → transfer →
(target: restore) → commit → resume on the target → release the source.

The source is released only after the target reports the process running. Until the commit any
failure — a refusal, a restore step, a lost connection, a dead agent, a timeout — thaws the source
exactly as it was. After the commit, a target that falls silent leaves the outcome unknown; the
source is then thawed too (a duplicate can be killed, a lost process cannot be brought back).
"""
import os
import time

from umig import dump, image
from umig.errors import UmigError
from umig.transport import Connection


def migrate(pid, target, requested_pid_mode="keep", timeout=60.0):
    started = time.monotonic()
    dump.refuse_blocked(pid)
    connection = Connection(target, timeout)
    frozen = None
    try:
        connection.send_control("hello", pid=pid, pid_mode=requested_pid_mode, host=os.uname().nodename)
        welcome = connection.expect("welcome", "greeting")
        frozen = dump.freeze(pid)
        frozen_at = time.monotonic()
        state, runs = dump.collect(frozen)
        writer = image.ImageWriter(connection.send_record)
        dump.write_image(writer, frozen, state, runs,
                         after_state=lambda: connection.expect("accepted", "checking the image"))
        connection.expect("ready", "restoring")
        connection.send_control("commit")
        running = connection.expect("running", "resuming")
        resumed_at = time.monotonic()
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
    return {"source_pid": pid, "target": connection.endpoint, "target_name": welcome.get("name"),
            "target_pid": running["target_pid"], "pages": writer.pages, "bytes": writer.bytes,
            "total_s": round(time.monotonic() - started, 6), "frozen_s": round(resumed_at - frozen_at, 6)}
