"""Bad input of every kind: damaged images, unknown versions, PIDs that cannot move, processes
holding what umig refuses, and garbage thrown at the agent. Each must end in one clear line (no
traceback), leave the process concerned unaffected and the agent serving."""
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time

import msgpack
import pytest
import xxhash
import zmq

from conftest import (alive, assert_clean_failure, assert_maps_equal, assert_no_leftovers,
                      assert_running_untraced, assert_same_output, c_workload, migrate, read_maps, reference_run,
                      run_umig, wait_gone, wait_until)
from umig import dump, image as umig_image
from umig.errors import DamagedImage, Refused

MAGIC = b"UMIGIMG\n"


# --------------------------------------------------------------------------- an image to damage

@pytest.fixture(scope="module")
def image(workloads, tmp_path_factory):
    """A dump of the memory workload (4 MiB of anonymous memory). The undamaged image must be
    accepted by `umig show` and `umig restore` (else refusing damaged copies proves nothing);
    the process restored from it is killed while it still waits, so that the files it has open
    stay as they were at the dump and every later restore of a damaged copy could succeed but
    for the damage."""
    d = tmp_path_factory.mktemp("image")
    wl = c_workload(workloads, "memory", d / "proc", "4").start().wait_ready()
    path = d / "memory.img"
    try:
        r = run_umig("dump", wl.pid, "-o", path)
        assert r.returncode == 0, f"umig dump failed: {r.stderr.strip()}"
    finally:
        wl.proc.kill()
        wl.wait_exit(60)
    r = run_umig("show", path)
    assert r.returncode == 0, f"umig show rejects the undamaged image: {r.stderr.strip()}"
    r = run_umig("restore", path, "--json")
    assert r.returncode == 0, f"umig restore rejects the undamaged image: {r.stderr.strip()}"
    tpid = json.loads(r.stdout)["target_pid"]
    assert alive(tpid), "the process restored from the undamaged image is not running"
    os.kill(tpid, signal.SIGKILL)
    wait_gone(tpid, 30, "process restored from the undamaged image")
    return {"path": path, "bytes": path.read_bytes(), "exe": str(wl.argv[0]), "pid": wl.pid}


def frames(data):
    """[(offset of the length prefix, offset of the frame, frame length)] of an image file
    (docs/image-format.md: the magic, then u64 little-endian length + frame, repeated)."""
    assert data[:len(MAGIC)] == MAGIC, "the image does not start with the documented magic"
    out, pos = [], len(MAGIC)
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, pos + 8, length))
        pos += 8 + length
    assert pos == len(data), "the image's frames do not add up to its size"
    return out


def damage_positions(data):
    """Named byte offsets all over the image: magic, length prefixes, record heads (digest,
    metadata), page payloads (including a page the workload filled with a marker), the end."""
    fr = frames(data)
    assert len(fr) >= 5, f"expected header, state, at least two page frames and end: {len(fr)} frames"
    pos = {
        "magic": 0,
        "magic-last": len(MAGIC) - 1,
        "header-length": fr[0][0],
        "header-digest": fr[0][1] + 3,
        "header-body": fr[0][1] + fr[0][2] // 2,
        "state-length": fr[1][0] + 1,
        "state-digest": fr[1][1],
        "state-start": fr[1][1] + 9,
        "state-middle": fr[1][1] + fr[1][2] // 2,
        "state-end": fr[1][1] + fr[1][2] - 1,
        "pages-head": fr[2][1] + fr[2][2] // 2,
        "pages-payload": fr[3][1] + 4096 * 3 + 17,
        "last-payload-middle": fr[-2][1] + fr[-2][2] // 2,
        "end-record": fr[-1][1] + fr[-1][2] // 2,
        "last-byte": len(data) - 1,
    }
    marker = data.find(b"UMIG-PAGE-MARK!\n" * 8)
    assert marker > 0, "the marker page of the memory workload is not in the image"
    pos["marker-page"] = marker + 100
    return pos


POSITIONS = ["magic", "magic-last", "header-length", "header-digest", "header-body", "state-length", "state-digest",
             "state-start", "state-middle", "state-end", "pages-head", "pages-payload", "marker-page",
             "last-payload-middle", "end-record", "last-byte"]


DAMAGE = re.compile(r"damaged|checksum|not a umig image|ends early|truncated|corrupt", re.I)


def assert_refused(path, what, *, must_contain=(), since=None, exe=None, source_pid=None, damage=True):
    """`umig show` and `umig restore` both refuse; with damage=True the message says why in
    words a user understands (damaged, checksum, not an image...)."""
    for command in (("show", path), ("restore", path, "--json")):
        r = run_umig(*command, timeout=120)
        line = assert_clean_failure(r, must_contain=must_contain, what=f"umig {command[0]} of {what}")
        assert not damage or DAMAGE.search(line), f"umig {command[0]} of {what}: the message does not say " \
                                                  f"the image is damaged: {line}"
        assert r.stdout.strip() == "" or command[0] == "show", f"umig restore printed {r.stdout!r}"
    if since is not None:
        assert_no_leftovers(since, markers=[exe] if exe else (), pids=[source_pid] if source_pid else ())


@pytest.mark.parametrize("where", POSITIONS)
def test_bit_flip_refused(image, tmp_path, where):
    """One flipped bit anywhere: `umig show` and `umig restore` refuse with one line and nothing
    of the process is left running."""
    data = bytearray(image["bytes"])
    offset = damage_positions(image["bytes"])[where]
    data[offset] ^= 0x10
    bad = tmp_path / f"flip-{where}.img"
    bad.write_bytes(bytes(data))
    assert_refused(bad, f"an image with a bit flipped at {where} (offset {offset})", since=time.time() - 0.5,
                   exe=image["exe"], source_pid=image["pid"])


@pytest.mark.parametrize("cut", ["empty", "magic-only", "half-header", "after-state", "mid-pages", "no-end",
                                 "one-byte-short"])
def test_truncated_refused(image, tmp_path, cut):
    data = image["bytes"]
    fr = frames(data)
    length = {"empty": 0, "magic-only": len(MAGIC), "half-header": fr[0][1] + fr[0][2] // 2,
              "after-state": fr[1][1] + fr[1][2], "mid-pages": fr[len(fr) // 2][1] + 5,
              "no-end": fr[-1][0], "one-byte-short": len(data) - 1}[cut]
    bad = tmp_path / f"cut-{cut}.img"
    bad.write_bytes(data[:length])
    assert_refused(bad, f"an image cut at {cut} ({length} bytes)", since=time.time() - 0.5, exe=image["exe"],
                   source_pid=image["pid"])


def test_not_an_image_refused(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(3).randbytes(100000))
    assert_refused(junk, "random bytes")
    assert_refused(tmp_path / "does-not-exist.img", "a missing file", must_contain=("does-not-exist.img",),
                   damage=False)


def rewrite_header(data, **changes):
    """The image with its header record's meta changed and its digest recomputed, so that only
    the change itself is wrong (docs/image-format.md: head = xxh3-64 of the body, then the
    msgpack body [kind, seq, meta, payload_length, payload_digest])."""
    fr = frames(data)
    _, start, length = fr[0]
    head = data[start:start + length]
    body = msgpack.unpackb(head[8:], strict_map_key=False)
    assert body[0] == "header", f"the first record is {body[0]!r}, not the header"
    body[2].update(changes)
    new_body = msgpack.packb(body)
    new_head = xxhash.xxh3_64_intdigest(new_body).to_bytes(8, "little") + new_body
    return data[:fr[0][0]] + struct.pack("<Q", len(new_head)) + new_head + data[start + length:]


def test_unknown_version_refused(image, tmp_path):
    """An image from a future umig: the message names the version."""
    future = tmp_path / "future.img"
    future.write_bytes(rewrite_header(image["bytes"], version=99))
    assert_refused(future, "a version 99 image", must_contain=("version", "99"), since=time.time() - 0.5,
                   exe=image["exe"], source_pid=image["pid"], damage=False)
    # the rewrite itself is sound: rewritten with nothing changed, the image is accepted
    same = tmp_path / "same.img"
    same.write_bytes(rewrite_header(image["bytes"]))
    assert same.read_bytes() == image["bytes"], "re-encoding the header changed it: the test's encoder is wrong"
    r = run_umig("show", same)
    assert r.returncode == 0, f"umig show of a header rewritten unchanged failed: {r.stderr.strip()}"


def test_foreign_format_refused(image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(rewrite_header(image["bytes"], format="criu"))
    assert_refused(other, "an image of another format")


def _records(*kinds, mode=None):
    """An ImageReader over a stream of these kinds of record (a header first, the first state
    in `mode`)."""
    meta = {"state": {"pid": 1, "mode": mode}, "end": {"records": len(kinds), "pages": 0, "bytes": 0}}
    records = [umig_image.header(1)] + [umig_image.Record(kind, meta.get(kind, {})) for kind in kinds]
    frames = iter([frame for seq, record in enumerate(records) for frame in umig_image.encode(record, seq)])
    return umig_image.ImageReader(lambda: next(frames))


@pytest.mark.parametrize("mode, before, late", [
    (None, ["state"], "sync"), (None, ["state"], "layout"),
    ("live", ["state", "layout"], "sync"), ("lazy", ["state", "layout", "state"], "sync"),
    ("live", ["state"], "state"), ("live", ["state", "layout", "state"], "pages"),
    ("lazy", ["state", "layout", "state"], "end")])
def test_record_out_of_place_refused(mode, before, late):
    """Syncs belong to live and lazy streams before their final layout; a final state to them,
    after the layout; a stop-and-copy image has neither, and after the final state a live stream
    ends, a lazy one resumes. Anything else is out of order."""
    assert [record.kind for record in _records("state", "sync", "layout", "state", "end", mode="live")] == \
        ["header", "state", "sync", "layout", "state", "end"]
    assert [record.kind for record in _records("state", "sync", "layout", "state", "resume", mode="lazy")] == \
        ["header", "state", "sync", "layout", "state", "resume"]
    records = _records(*before, late, mode=mode)
    for _ in range(1 + len(before)):
        next(records)
    with pytest.raises(DamagedImage, match=f"a {late} record where"):
        next(records)


# --------------------------------------------------------------------------- PIDs that cannot move

def unused_pid():
    """A PID that was just used and is free now (its process ran and was reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    assert not os.path.exists(f"/proc/{p.pid}")
    return p.pid


@pytest.mark.parametrize("command", ["check", "migrate", "dump"])
def test_missing_pid(agent, tmp_path, command):
    pid = unused_pid()
    args = {"check": ("check", pid), "migrate": ("migrate", pid, agent.target()),
            "dump": ("dump", pid, "-o", tmp_path / "x.img")}[command]
    r = run_umig(*args)
    if command == "check":
        assert r.returncode != 0 and str(pid) in r.stdout + r.stderr and "Traceback" not in r.stderr
    else:
        assert_clean_failure(r, must_contain=(str(pid),), what=f"umig {command} of a missing pid")
    assert not (tmp_path / "x.img").exists(), "umig dump left an image of a process that does not exist"


@pytest.mark.parametrize("command", ["check", "migrate", "dump"])
def test_kernel_thread(agent, tmp_path, command):
    """PID 2 (kthreadd) is a kernel thread."""
    args = {"check": ("check", 2), "migrate": ("migrate", 2, agent.target()),
            "dump": ("dump", 2, "-o", tmp_path / "k.img")}[command]
    r = run_umig(*args)
    if command == "check":
        assert r.returncode != 0 and "kernel thread" in (r.stdout + r.stderr).lower(), r
        assert "Traceback" not in r.stderr
    else:
        assert_clean_failure(r, must_contain=("kernel thread",), what=f"umig {command} 2")
    assert not (tmp_path / "k.img").exists()


BLOCKERS = {
    "pipe": [r"fd 5: pipe", r"fd 6: pipe"],
    "socket": [r"fd 5: socket"],
    "eventfd": [r"fd 5: \S*eventfd"],
    "epoll": [r"fd 5: \S*(epoll|eventpoll)"],
    "pty": [r"fd 5: .*(tty|pty|ptmx)"],
    "thread": [r"2 threads"],
    "child": [r"child"],
}


@pytest.mark.parametrize("kind", list(BLOCKERS))
def test_refused_before_freezing(agent, workloads, registry, tmp_path, kind):
    """`umig check` lists the blocker; `umig migrate` and `umig dump` refuse naming it; the
    agent never hears of the process, which goes on unaffected."""
    ref = reference_run(c_workload(workloads, "holder", tmp_path / "ref", kind, registry=registry))
    src = c_workload(workloads, "holder", tmp_path / "src", kind, registry=registry).start().wait_ready()
    maps = read_maps(src.pid)
    r = run_umig("check", src.pid)
    listing = r.stdout + r.stderr
    assert r.returncode != 0, f"umig check says a process holding a {kind} can move: {listing}"
    assert "Traceback" not in listing
    for pattern in BLOCKERS[kind]:
        assert re.search(pattern, listing, re.I), f"umig check should list /{pattern}/:\n{listing}"
    mark = agent.mark()
    line = assert_clean_failure(run_umig("migrate", src.pid, agent.target()), what=f"umig migrate ({kind})")
    assert re.search(BLOCKERS[kind][0], line, re.I), f"the refusal should name /{BLOCKERS[kind][0]}/: {line}"
    line = assert_clean_failure(run_umig("dump", src.pid, "-o", tmp_path / "h.img"), what=f"umig dump ({kind})")
    assert not (tmp_path / "h.img").exists()
    assert f"pid {src.pid}" not in agent.log(mark), f"the agent heard of a refused process:\n{agent.log(mark)}"
    assert_running_untraced(src.pid, "refused process")
    assert_maps_equal(maps, read_maps(src.pid), "after the refusals")
    src.fire()
    assert src.wait_exit(60) == 0
    assert_same_output(src, ref)
    agent.assert_alive()


# --------------------------------------------------------------------------- garbage at the agent

def send_raw(port, payload, read=True):
    """Send bytes to the agent's TCP port; it may answer or hang up, either is fine."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            if read:
                s.settimeout(1)
                s.recv(4096)
    except OSError:
        pass


def zmq_exchange(endpoint, sock_type, messages, wait_reply=1.0):
    """Send multipart messages from a fresh socket, collecting what comes back within wait_reply
    after each (DEALER/REQ only)."""
    s = zmq.Context.instance().socket(sock_type)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 2000)
    replies = []
    try:
        s.connect(endpoint)
        for frames in messages:
            try:
                s.send_multipart(frames)
            except zmq.Again:
                break
            if sock_type in (zmq.DEALER, zmq.REQ):
                if not s.poll(int(wait_reply * 1000), zmq.POLLIN):
                    if sock_type == zmq.REQ:
                        break  # a REQ socket cannot send again before a reply
                    continue
                replies.append(s.recv_multipart())
    finally:
        s.close(0)
    return replies


def test_agent_survives_garbage(agent, workloads, registry, tmp_path):
    """Raw bytes, a broken ZMTP greeting, malformed ZeroMQ messages and a hello followed by a
    corrupt record: the agent answers or ignores them, stays up, and then migrates a process."""
    port = int(agent.target().rsplit(":", 1)[1])
    rnd = random.Random(11)
    send_raw(port, rnd.randbytes(100000))
    send_raw(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    send_raw(port, b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16 + b"\x00" * 32 +
             rnd.randbytes(5000))  # a ZMTP 3.0 greeting, then junk
    send_raw(port, b"\xff" + b"\xff" * 8 + b"\x7f" + b"\x03\x01" + b"CURVE" + b"\x00" * 15 + b"\x01" * 32, read=False)
    agent.assert_alive()

    endpoint = agent.target()
    body = lambda obj: msgpack.packb(obj)  # noqa: E731
    replies = zmq_exchange(endpoint, zmq.DEALER, [
        [b"\xff\xfe\xfd"],                           # an undecodable kind
        [b"hello", b"\xc1\xc1"],                     # not msgpack
        [b"hello", body([1, 2, 3])],                 # msgpack, not a map
        [b"commit", body({})],                       # out of order
        [b"record", b"\x00" * 3],                    # a record outside a migration
        [b"abort", body({"reason": "x"})],
    ])
    assert replies, "the agent did not answer malformed messages at all"
    for frames in replies:
        assert frames[0] == b"failed", f"a malformed message got {frames!r}"
    # a hello, then a record whose head fails its checksum, then one with absurd fields
    replies = zmq_exchange(endpoint, zmq.DEALER, [
        [b"hello", body({"pid": 1234567, "pid_mode": "keep", "host": "garbage"})],
        [b"record", b"\x00" * 8 + body(["header", 0, {}, -1, 0])],
    ])
    assert any(f[0] == b"failed" for f in replies), f"a corrupt record got {replies!r}"
    replies = zmq_exchange(endpoint, zmq.DEALER, [
        [b"hello", body({"pid": "x", "pid_mode": ["weird"], "host": 5})],
        [b"record", rnd.randbytes(3000), rnd.randbytes(10)],
    ])
    zmq_exchange(endpoint, zmq.REQ, [[b"hello", body({})]], wait_reply=0.5)
    zmq_exchange(endpoint, zmq.PUSH, [[b"hello"], [b"record", b"zz"]], wait_reply=0)
    agent.assert_alive()

    # still a working agent
    ref = reference_run(c_workload(workloads, "memory", tmp_path / "ref", "4", registry=registry))
    wl = c_workload(workloads, "memory", tmp_path / "mig", "4", registry=registry).start().wait_ready()
    maps = read_maps(wl.pid)
    mark = agent.mark()
    info = migrate(wl.pid, agent.target())
    registry.remember(info["target_pid"])
    assert read_maps(info["target_pid"]).count("\n") == maps.count("\n")
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(info["target_pid"], 60, mark) == ("status", 0)
    assert_same_output(wl, ref)


def test_a_process_that_exits_between_check_and_freeze_is_named_so():
    """The kernel refuses PTRACE_SEIZE of an exiting process with EPERM; umig says it exited (a
    zombie, checked before the freeze would have refused it, stands for the race)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_until(lambda: open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z", 5, "a zombie")
        with pytest.raises(Refused, match=rf"^pid {pid} exited before umig could freeze it$"):
            dump.freeze(pid)
    finally:
        os.waitpid(pid, 0)


def test_a_deleted_working_directory_is_named_so(agent, tmp_path, registry):
    """A process whose working directory was removed cannot move (nothing there to go back to):
    check and migrate say so in those words, not as a directory elsewhere."""
    where = tmp_path / "gone"
    where.mkdir()
    proc = subprocess.Popen(["sleep", "100"], cwd=where)
    registry.remember(proc.pid)
    try:
        where.rmdir()
        r = run_umig("check", proc.pid)
        assert r.returncode != 0 and f"working directory {where} was deleted" in r.stdout, r.stdout
        assert_clean_failure(run_umig("migrate", proc.pid, agent.target()),
                             must_contain=(f"working directory {where} was deleted",), what="umig migrate")
        assert_running_untraced(proc.pid, "the refused process")
    finally:
        proc.kill()
        proc.wait()
