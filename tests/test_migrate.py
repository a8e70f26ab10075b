"""Live migrations that must succeed, each checked by how the process continues: its output
(and files) equal a run that was never migrated, its memory layout is the same, it keeps its
PID (in a new PID namespace: the old one is still taken on this host), and it exits 0."""
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import (Workload, assert_clean_failure, assert_maps_equal, assert_running_untraced, assert_same_output,
                      c_workload, migrate, nspid, proc_status, read_maps, reference_run, run_umig, sha256_file,
                      wait_gone, wait_until, write_input_text)
from umig.state import memory


def check_restored(info, source_pid, source_exe, maps_before, agent, since, *, pid_mode="keep"):
    """What must hold right after `umig migrate` returned, before the trigger."""
    tpid = info["target_pid"]
    maps_after = read_maps(tpid)
    assert_maps_equal(maps_before, maps_after)
    assert os.readlink(f"/proc/{tpid}/exe") == source_exe
    ns = nspid(tpid)
    assert ns[0] == tpid, f"target_pid {tpid} is not the host's view of the restored process: NSpid {ns}"
    if pid_mode == "keep":
        assert ns[-1] == source_pid, f"the restored process should keep PID {source_pid}; NSpid {ns}"
    else:
        assert len(ns) == len(nspid(agent.proc.pid)), f"--pid any should not make a PID namespace; NSpid {ns}"
    m = agent.wait_for_line(rf"^{agent.name}: incoming pid {source_pid} from \S+: (\d+) mappings, (\d+) pages",
                            30, since)
    assert int(m[1]) == len(maps_before.splitlines()), (
        f"the agent announced {m[1]} mappings, the source had {len(maps_before.splitlines())}")
    m = agent.wait_for_line(rf"^{agent.name}: pid {source_pid} restored as (\d+) \((\d+) pages, (\d+) bytes", 30,
                            since)
    assert (int(m[1]), int(m[2]), int(m[3])) == (tpid, info["pages"], info["bytes"]), (
        f"agent log {m[0]!r} disagrees with umig migrate's report {info}")


def migrate_and_compare(agent, registry, make, *, prepare=None, files=(), target=None, extra=(), netns=None,
                        before_migrate=None, after_restore=None, pid_mode="keep", timeout=120):
    """The whole check for one workload: `make(dir)` builds an unstarted Workload."""
    ref = make("ref")
    if prepare:
        prepare(ref.dir)
    reference_run(ref, timeout)

    wl = make("mig")
    if prepare:
        prepare(wl.dir)
    wl.start().wait_ready()
    if before_migrate:
        before_migrate(wl)
    maps_before = read_maps(wl.pid)
    exe = os.readlink(f"/proc/{wl.pid}/exe")
    since = agent.mark()
    info = migrate(wl.pid, target or agent.target(), *extra, netns=netns)
    registry.remember(info["target_pid"])
    check_restored(info, wl.pid, exe, maps_before, agent, since, pid_mode=pid_mode)
    if after_restore:
        after_restore(info)
    wl.wait_exit(30)  # the source is released once the target runs
    wl.fire()
    outcome = agent.wait_exit(info["target_pid"], timeout, since)
    assert outcome == ("status", 0), f"restored {wl.name} ended with {outcome}; stderr={wl.stderr()!r}"
    assert_same_output(wl, ref, files)
    agent.assert_alive()
    return wl, ref, info


@pytest.fixture
def c_make(workloads, registry, tmp_path):
    """c_make(name, *extra) -> make(label) -> Workload in tmp_path/label."""
    def bind(name, *extra, env=None, defines=(), prefix=()):
        return lambda label: c_workload(workloads, name, tmp_path / label, *extra, registry=registry, env=env,
                                        defines=defines, prefix=prefix)
    return bind


# --------------------------------------------------------------------------- the workloads

def test_memory(agent, registry, c_make):
    """Heap, private/shared anonymous, sparse (wide enough that the dump reads smaps on a second
    thread), copy-on-write file and read-only file mappings, pages the process can no longer read
    (PROT_NONE): every byte, protections, brk, argv and MAP_SHARED/MAP_PRIVATE semantics after the move.
    `umig check` first says the process can move."""
    def check(wl):
        r = run_umig("check", wl.pid)
        assert r.returncode == 0, f"umig check {wl.pid} finds blockers in a movable process: {r.stdout}{r.stderr}"
        page_tables = int(proc_status(wl.pid)["VmPTE"].split()[0])
        assert page_tables >= memory.WALK_ON_A_THREAD_KIB, f"only {page_tables} kB of page tables"
    wl, _, info = migrate_and_compare(agent, registry, c_make("memory"), before_migrate=check)
    out = wl.stdout()
    assert "heap: 0 bad bytes" in out and "write ro file mapping: fault" in out
    assert "hidden: 0 bad bytes, 0 bad zero bytes" in out and "wide: 0 bad bytes, 0 bad zero bytes" in out
    assert info["pages"] > 16 * 256 // 2, f"too few pages travelled for a 16 MiB anonymous region: {info}"


@contextlib.contextmanager
def process_holding(registry, size, fill):
    """A Python child holding `size` bytes of anonymous memory `m` (an mmap) that the statements
    of `fill` have written; yields (pid, the memory's address), and ends the child."""
    child = subprocess.Popen([sys.executable, "-c", f"import ctypes, mmap, sys\nm = mmap.mmap(-1, {size})\n"
                              + textwrap.dedent(fill)
                              + "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\nsys.stdin.read()\n"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    registry.remember(child.pid)
    try:
        yield child.pid, int(child.stdout.readline())
    finally:
        child.kill()
        child.wait()


def test_a_batch_of_zero_pages_does_not_turn_the_ring(registry):
    """read_batches hands out its buffers in a ring: a batch stays as it is until `ring` more
    have been asked for (ZeroMQ may still be sending it). A batch whose pages are all zeros is
    left out and must not take a buffer from the ring (it once overwrote the batch before it)."""
    page = 4096
    with process_holding(registry, 12 * page, f"""
            m[:4 * {page}] = b"A" * (4 * {page})
            m[4 * {page}:8 * {page}] = bytes(4 * {page})  # present, all zeros
            m[8 * {page}:] = b"C" * (4 * {page})
            """) as (pid, start):
        region = [[start, 12 * page]]
        batches = memory.read_batches(pid, region, batch_bytes=4 * page, zero_spans=region, ring=2)
        first_runs, first = next(batches)
        second_runs, second = next(batches)
        assert (first_runs, second_runs) == ([[start, 4 * page]], [[start + 8 * page, 4 * page]])
        assert bytes(first) == b"A" * (4 * page) and bytes(second) == b"C" * (4 * page)


LOCKER_SCRIPT = textwrap.dedent('''\
    import ctypes, sys, time

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = 64 << 20

    def untouched():
        return libc.mmap(None, size, 3, 0x4022, -1, 0)  # read-write, private, anonymous, noreserve

    if sys.argv[1] == "mlock2":
        address = untouched()
        assert libc.mlock2(ctypes.c_void_p(address), ctypes.c_size_t(size), 1) == 0  # MLOCK_ONFAULT
    else:
        assert libc.mlockall(2 | 4) == 0  # MCL_FUTURE | MCL_ONFAULT: what is mapped from now on
        address = untouched()
    print(f"{address:x} {address + size:x}", flush=True)
    print("ready", flush=True)
    time.sleep(600)
''')


@pytest.mark.parametrize("how", ["mlock2", "mlockall"])
def test_mlocked_mapping_refused(agent, registry, tmp_path, how):
    """A locked mapping none of whose pages is present (locked on fault) is still found before
    the freeze: `umig check` and `umig migrate` name it, and the process runs on untouched."""
    script = tmp_path / "locker.py"
    script.write_text(LOCKER_SCRIPT)
    wl = Workload([sys.executable, "-I", script, how], tmp_path / how, registry=registry, name="locker")
    wl.start().wait_ready()
    start, end = (int(x, 16) for x in wl.stdout().split()[:2])
    assert proc_status(wl.pid)["VmLck"] != "0 kB", "the kernel should count a mapping locked on fault"
    refusal = re.compile(r"mapping ([0-9a-f]+)-([0-9a-f]+) \(anonymous\) is locked in memory \(mlock\), "
                         r"which does not move yet")

    def names_ours(text):  # with mlockall, what Python maps later is locked too, and may join ours
        return any(int(lo, 16) <= start and end <= int(hi, 16) for lo, hi in refusal.findall(text))

    r = run_umig("check", wl.pid)
    assert r.returncode != 0 and names_ours(r.stdout + r.stderr), f"umig check: {r.stdout}{r.stderr}"
    mark = agent.mark()
    line = assert_clean_failure(run_umig("migrate", wl.pid, agent.target()), what=f"umig migrate ({how})")
    assert refusal.search(line), line
    assert f"pid {wl.pid}" not in agent.log(mark), f"the agent heard of a refused process:\n{agent.log(mark)}"
    assert_running_untraced(wl.pid, "refused process")


def test_registers(agent, registry, c_make):
    """ymm0-15, callee-saved GPRs, MXCSR and x87 state held by a raw-syscall wait loop.
    Also uses the HOST:PORT form of the target."""
    host_port = agent.target().removeprefix("tcp://")
    wl, _, _ = migrate_and_compare(agent, registry, c_make("registers"), target=host_port)
    assert "registers: ok" in wl.stdout()


def test_another_users_process(agent, registry, workloads):
    """A process of uid 65534, not root's: its resource limits come from /proc (prlimit() of
    another user's process needs CAP_SYS_RESOURCE, which root lacks here) and its credentials
    travel with it."""
    home = Path(tempfile.mkdtemp(prefix="umig-uid-"))  # pytest's own directories are root's only
    try:
        home.chmod(0o755)
        exe = home / "signals"
        shutil.copy(workloads("signals"), exe)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

        def make(label):
            return Workload([exe, home / label / "trigger", home / label], home / label, prefix=as_nobody,
                            registry=registry, name="signals")

        def uids_kept(info):
            uids = proc_status(info["target_pid"])["Uid"].split()
            assert uids == ["65534"] * 4, f"the restored process runs as {uids}"

        wl, _, _ = migrate_and_compare(agent, registry, make, after_restore=uids_kept)
        assert "pid: kept" in wl.stdout()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_signals(agent, registry, c_make):
    """Handlers (flags, masks, restorer), blocked mask, pending standard/real-time/thread-directed
    signals with their siginfo, sigaltstack, raise() after the move (needs the PID kept)."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("signals"))
    out = wl.stdout()
    assert "pid: kept" in out and "handled 36 code -1 value 111" in out and "altstack yes" in out


def test_signals_an_agent_ignores_stay_default(agent_factory, registry, c_make):
    """The restorer inherits the signals its agent ignores; the process had them at their
    default, and has them so after the move."""
    deaf = agent_factory("deaf", prefix=["env", "--ignore-signal=HUP,USR2,TERM"])
    ignored = {}

    def note(wl):
        ignored["before"] = proc_status(wl.pid)["SigIgn"]

    def compare(info):
        assert proc_status(info["target_pid"])["SigIgn"] == ignored["before"]
    migrate_and_compare(deaf, registry, c_make("memory", "4"), before_migrate=note, after_restore=compare)


def test_all_zero_pages_of_fresh_memory_stay_home(registry):
    """Pages that read as zeros where the target maps fresh memory are not sent: written with
    zeros, or never touched; a page with a zero first word and data after it is sent whole."""
    pages = 48
    with process_holding(registry, pages * 4096, f"""
            for i in range({pages}):
                if i % 3 == 0:
                    m[i * 4096] = 0                          # touched, all zeros
                elif i % 3 == 1:
                    m[i * 4096 + (100 if i % 2 else 0)] = i  # data, after a zero word or not
            """) as (pid, start):
        region = [[start, pages * 4096]]
        batches = list(memory.read_batches(pid, region, zero_spans=region))
        kept = [(run_start, length) for runs, _ in batches for run_start, length in runs]
        assert kept == [(start + i * 4096, 4096) for i in range(1, pages, 3)]
        data = b"".join(bytes(buffer) for _, buffer in batches)
        for n, i in enumerate(range(1, pages, 3)):
            expected = bytearray(4096)
            expected[100 if i % 2 else 0] = i
            assert data[n * 4096:(n + 1) * 4096] == expected


def test_files(agent, registry, c_make):
    """Regular files at offsets (read, pwrite, write, O_APPEND), character devices, FD_CLOEXEC,
    O_NONBLOCK, cwd and umask; the files written are compared too."""
    migrate_and_compare(agent, registry, c_make("files"), prepare=lambda d: write_input_text(d / "input.txt"),
                        files=("out.dat", "log.txt", "new.dat"))


def test_dup_shares_offset(agent, registry, c_make):
    """Two descriptors of one open file description (dup) still share one offset."""
    migrate_and_compare(agent, registry, c_make("files", "dup"),
                        prepare=lambda d: write_input_text(d / "input.txt"), files=("out.dat", "log.txt"))


@pytest.mark.parametrize("rseq", ["glibc", "none"])
def test_rseq(agent, registry, c_make, rseq):
    """glibc's rseq registration survives (same area, length, signature) and the kernel keeps
    updating cpu_id; a process without rseq (glibc.pthread.rseq=0) gets none."""
    env = dict(os.environ)
    if rseq == "none":
        env["GLIBC_TUNABLES"] = "glibc.pthread.rseq=0"
    wl, _, _ = migrate_and_compare(agent, registry, c_make("rseq", env=env))
    expect = "yes" if rseq == "glibc" else "no"
    assert wl.stdout().count(f"rseq registered: {expect}\n") == 2, wl.stdout()


@pytest.mark.parametrize("mode", ["stop", "live", "lazy"])
def test_a_periodic_timer_keeps_ticking(agent, registry, c_make, mode):
    """An ITIMER_REAL every 2 ms: frozen longer than that, its SIGALRM is pending and the kernel
    re-arms the timer only when that signal is taken. The move carries it armed all the same."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("ticker"), extra=() if mode == "stop" else (f"--{mode}",))
    assert "timer still ticking" in wl.stdout()


def test_sleeper(agent, registry, c_make):
    """Migrated while blocked in nanosleep: the sleep completes (at least the requested time)."""
    def in_nanosleep(wl):
        # glibc's nanosleep is the clock_nanosleep syscall (230); 35 is nanosleep itself
        wait_until(lambda: Path(f"/proc/{wl.pid}/syscall").read_text().split()[0] in ("230", "35"), 10,
                   "the sleeper to block in nanosleep")
    wl, _, _ = migrate_and_compare(agent, registry, c_make("sleeper"), before_migrate=in_nanosleep)
    assert "slept long enough: yes" in wl.stdout()


PY_SCRIPT = textwrap.dedent('''\
    import hashlib, os, sys, time

    trigger = sys.argv[1]

    def primes():
        found = []
        n = 2
        while True:
            if all(n % p for p in found if p * p <= n):
                found.append(n)
                yield n
            n += 1

    class Account:
        def __init__(self, name):
            self.name, self.history = name, []
        def add(self, v):
            self.history.append(v)
            return sum(self.history)

    gen = primes()
    first = [next(gen) for _ in range(400)]
    table = {f"k{i}": i * i for i in range(20000)}
    acc = Account("a")
    totals = [acc.add(v % 97) for v in first]
    blob = bytearray(range(256)) * 4096
    print("phase1", sum(first), first[-1], len(table), totals[-1],
          hashlib.sha256(repr(sorted(table.items())[:500]).encode()).hexdigest(), flush=True)
    print("ready", flush=True)
    while not os.path.exists(trigger):
        time.sleep(0.01)

    more = [next(gen) for _ in range(400)]
    print("phase2 generator", sum(more), more[-1])
    squares = {k: v + 1 for k, v in table.items() if v % 3 == 0}
    print("dict", len(squares), sum(squares.values()), squares["k300"])
    print("object", acc.name, acc.add(5), len(acc.history))
    print("blob", hashlib.sha256(bytes(blob)).hexdigest())
    import decimal, fractions, json  # modules loaded from disk after the move
    print("imports", json.dumps({"b": [1, 2], "a": None}, sort_keys=True), decimal.Decimal(1) / decimal.Decimal(7),
          fractions.Fraction(3, 9))
    try:
        {}["missing"]
    except KeyError as e:
        print("caught", repr(e))
    print("set", sorted({x % 7 for x in more}))
    print("done", flush=True)
''')


def test_python(agent, registry, tmp_path):
    """An unmodified CPython running a script: generator, dicts, objects, imports after the move."""
    script = tmp_path / "workload.py"
    script.write_text(PY_SCRIPT)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")

    def make(label):
        d = tmp_path / label
        return Workload([sys.executable, "-I", script, d / "trigger"], d, env=env, registry=registry, name="python")
    migrate_and_compare(agent, registry, make)


# --------------------------------------------------------------------------- a program nobody here wrote

GZIP_MIB = 128


@pytest.fixture(scope="session")
def gzip_input(tmp_path_factory):
    """~128 MiB of deterministic word-like text: gzip needs a few seconds for it."""
    rnd = random.Random(20240601)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randrange(2, 9)))
             for _ in range(3000)]
    block = bytearray()
    while len(block) < (16 << 20):
        block += b" ".join(rnd.choices(words, k=12)) + b"\n"
    path = tmp_path_factory.mktemp("gzip") / "input.txt"
    with open(path, "wb") as f:
        alphabet = b"abcdefghijklmnopqrstuvwxyz"
        for i in range(GZIP_MIB // 16):
            rotated = alphabet[i:] + alphabet[:i]
            f.write(bytes(block).translate(bytes.maketrans(alphabet, rotated)))
    return path


def test_gzip(agent, registry, tmp_path, gzip_input):
    """`gzip -n -c` migrated mid-run (no trigger): the compressed output is byte-identical to an
    unmigrated run's."""
    size = gzip_input.stat().st_size

    def start(label):
        d = tmp_path / label
        d.mkdir()
        with open(gzip_input, "rb") as i, open(d / "out.gz", "wb") as o, open(d / "stderr.txt", "wb") as e:
            p = subprocess.Popen(["gzip", "-n", "-c"], stdin=i, stdout=o, stderr=e, start_new_session=True,
                                 close_fds=True)
        registry.remember(p.pid, group=True)
        return p, d

    ref, ref_dir = start("ref")  # runs alongside; only its output matters
    src, src_dir = start("mig")
    time.sleep(0.3)
    pos_line = [ln for ln in Path(f"/proc/{src.pid}/fdinfo/0").read_text().splitlines() if ln.startswith("pos:")]
    assert src.poll() is None and int(pos_line[0].split()[1]) < size, (
        "gzip finished reading its input before the migration started: the input is too small for this machine")
    maps_before = read_maps(src.pid)
    since = agent.mark()
    info = migrate(src.pid, agent.target())
    tpid = info["target_pid"]
    registry.remember(tpid)
    src.wait(30)  # the source is released once the target runs
    assert_maps_equal(maps_before, read_maps(tpid))
    outcome = agent.wait_exit(tpid, 120, since)
    assert outcome == ("status", 0), f"restored gzip ended with {outcome}"
    assert ref.wait(120) == 0
    assert (src_dir / "stderr.txt").read_bytes() == b""
    assert (src_dir / "out.gz").stat().st_size == (ref_dir / "out.gz").stat().st_size
    assert sha256_file(src_dir / "out.gz") == sha256_file(ref_dir / "out.gz"), "gzip output differs after migration"


# --------------------------------------------------------------------------- other ways of moving

def test_between_network_namespaces(netns_pair, registry, c_make, agent_factory):
    """Workload and `umig migrate` in netns A, the agent in netns B, joined by a veth pair."""
    ns = netns_pair
    listen = f"tcp://{ns.ip_b}:{random.randrange(20000, 40000)}"
    b_agent = agent_factory("node-b", listen=listen, prefix=["ip", "netns", "exec", ns.b])

    def in_netns_b(info):
        tpid = info["target_pid"]
        assert os.readlink(f"/proc/{tpid}/ns/net") == os.readlink(f"/proc/{b_agent.proc.pid}/ns/net"), \
            "the restored process is not in the target agent's network namespace"
    make = c_make("memory", prefix=["ip", "netns", "exec", ns.a])
    migrate_and_compare(b_agent, registry, make, netns=ns.a, after_restore=in_netns_b)


def test_dump_restore(registry, c_make, tmp_path):
    """`umig dump PID -o F` ends the source once the image is complete; `umig restore F --json`
    brings it back and it continues as if nothing happened."""
    make = c_make("memory")
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    maps_before = read_maps(wl.pid)
    exe = os.readlink(f"/proc/{wl.pid}/exe")
    image = tmp_path / "memory.img"
    r = run_umig("dump", wl.pid, "-o", image)
    assert r.returncode == 0, f"umig dump failed: {r.stderr.strip()}"
    assert image.stat().st_size > 16 << 20
    wl.wait_exit(30)  # dump ends the source
    r = run_umig("restore", image, "--json")
    assert r.returncode == 0, f"umig restore failed: {r.stderr.strip()}"
    info = json.loads(r.stdout)
    tpid = info["target_pid"]
    registry.remember(tpid)
    assert_maps_equal(maps_before, read_maps(tpid))
    assert os.readlink(f"/proc/{tpid}/exe") == exe
    assert nspid(tpid)[-1] == wl.pid
    wl.fire()
    wait_gone(tpid, 60, "restored process")
    assert_same_output(wl, ref)


def test_pid_any(agent, registry, c_make):
    """--pid any: the process takes whatever PID comes, in the agent's own PID namespace."""
    wl, _, info = migrate_and_compare(agent, registry, c_make("memory"), extra=("--pid", "any"), pid_mode="any")
    assert info["target_pid"] != wl.pid


def test_migrate_twice(agent, registry, c_make, agent_factory):
    """A restored process (living in a PID namespace) moves on to a second agent and still
    keeps its PID: signals raised to itself after the second move reach it."""
    second = agent_factory("second")
    make = c_make("signals")
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    maps_before = read_maps(wl.pid)
    exe = os.readlink(f"/proc/{wl.pid}/exe")
    since1 = agent.mark()
    first = migrate(wl.pid, agent.target())
    registry.remember(first["target_pid"])
    check_restored(first, wl.pid, exe, maps_before, agent, since1)
    wl.wait_exit(30)
    since2 = second.mark()
    hop = migrate(first["target_pid"], second.target())
    registry.remember(hop["target_pid"])
    assert nspid(hop["target_pid"])[-1] == wl.pid, "the second hop lost the process's own PID"
    assert_maps_equal(maps_before, read_maps(hop["target_pid"]))
    # the first twin is gone: the agent saw it end (killed as a released source)
    agent.wait_for_line(rf"^{agent.name}: restored pid {first['target_pid']} ", 30, since1)
    wl.fire()
    assert second.wait_exit(hop["target_pid"], 60, since2) == ("status", 0)
    assert_same_output(wl, ref)


def test_exit_status_and_signal_reported(agent, registry, c_make):
    """The agent reports how a restored process ends: its exit status, or the signal that killed
    it (the process lives in a PID namespace of its own here, whose init must pass that on)."""
    wl = c_make("sleeper", "0", "7")("exit7").start().wait_ready()
    since = agent.mark()
    info = migrate(wl.pid, agent.target())
    registry.remember(info["target_pid"])
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 7)
    assert wl.stdout().endswith("done\n")

    wl = c_make("sleeper", "0")("term").start().wait_ready()
    since = agent.mark()
    info = migrate(wl.pid, agent.target())
    registry.remember(info["target_pid"])
    wl.wait_exit(30)
    os.kill(info["target_pid"], signal.SIGTERM)
    assert agent.wait_exit(info["target_pid"], 60, since) == ("signal", "SIGTERM")
