"""Shared machinery of umig's test suite: workloads compiled from tests/workloads, agents,
network namespaces, running the CLI, waiting for processes, comparing runs.

Everything here drives real processes: real ptrace, real ZeroMQ sockets, the real restorer.
A workload (see tests/workloads/README.md) prints deterministic phase-1 results, then `ready`,
waits for its trigger file, does phase 2 and exits 0. A test migrates it while it waits and
compares what it printed with a run that was never migrated.
"""
import contextlib
import difflib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKLOAD_SRC = TESTS / "workloads"
RESTORER_NAME = "umig-restorer"


# --------------------------------------------------------------------------- environment

def umig_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("UMIG_DEBUG", None)
    if extra:
        env.update(extra)
    return env


def umig_cmd(*args):
    return [sys.executable, "-m", "umig", *map(str, args)]


def netns_prefix(netns):
    return ["ip", "netns", "exec", netns] if netns else []


def run_umig(*args, netns=None, timeout=180, env=None):
    """Run `python -m umig ARGS...` to completion; returns the CompletedProcess (text)."""
    cmd = netns_prefix(netns) + umig_cmd(*args)
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=umig_env(env), cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`umig {' '.join(map(str, args))}` did not finish within {timeout} s; "
                    f"stdout={e.stdout!r} stderr={e.stderr!r}")


def assert_clean_failure(result, *, must_contain=(), what="umig"):
    """A failure as the contract says: non-zero exit, one line on stderr starting `umig: `,
    no traceback, not an internal error. Returns that line."""
    stderr = result.stderr.strip()
    assert result.returncode != 0, f"{what} should have failed; stdout={result.stdout[:500]!r} stderr={stderr!r}"
    assert "Traceback" not in result.stderr, f"{what} printed a traceback:\n{result.stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"{what} should print exactly one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("umig: "), f"{what}: error line should start with 'umig: ': {line!r}"
    assert "internal error" not in line, f"{what} hit an internal error instead of a clear refusal: {line!r}"
    for needle in must_contain:
        assert needle.lower() in line.lower(), f"{what}: error should mention {needle!r}: {line!r}"
    return line


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proc_state(pid):
    """The one-letter state of /proc/PID/stat, or None when the PID is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def proc_status(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def alive(pid):
    return proc_state(pid) not in (None, "Z", "X")


def wait_gone(pid, timeout=60, what="process"):
    """Wait until PID is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} {pid} still running after {timeout} s (state {proc_state(pid)})")
        time.sleep(0.02)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def assert_running_untraced(pid, what="source"):
    """The process exists, is not stopped and nobody traces it."""
    state = proc_state(pid)
    assert state is not None and state not in ("Z", "X"), f"{what} {pid} is gone (state {state})"
    # A just-thawed process may need a moment to leave the stopped state.
    wait_until(lambda: proc_state(pid) not in ("t", "T"), 10, f"{what} {pid} to leave the stopped state")
    assert proc_status(pid)["TracerPid"] == "0", f"{what} {pid} is still traced"


# --------------------------------------------------------------------------- /proc/PID/maps

MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def read_maps(pid):
    return Path(f"/proc/{pid}/maps").read_text()


def parse_maps(text):
    """[(start, end, perms, offset, path)] — the fields that must survive a migration
    (device and inode numbers are the kernel's business: a shared anonymous mapping is a new
    /dev/zero inode on the target)."""
    out = []
    for line in text.splitlines():
        m = MAPS_RE.match(line)
        assert m, f"unparsable maps line {line!r}"
        out.append((m[1], m[2], m[3], m[4], m[7]))
    return out


def assert_maps_equal(before, after, what="after migration"):
    assert RESTORER_NAME not in after, f"the process maps the restorer {what}:\n{after}"
    b, a = parse_maps(before), parse_maps(after)
    if b != a:
        fmt = lambda rows: [" ".join(r) for r in rows]  # noqa: E731
        diff = "\n".join(difflib.unified_diff(fmt(b), fmt(a), "before", what, lineterm=""))
        pytest.fail(f"memory layout differs {what}:\n{diff}")


# --------------------------------------------------------------------------- building workloads

class Workloads:
    """Compiles tests/workloads/NAME.c on first use (once per session and set of flags)."""

    FLAGS = {"holder": ["-pthread"]}

    def __init__(self, bindir):
        self.bindir = Path(bindir)
        self._built = {}
        self._lock = threading.Lock()

    def __call__(self, name, *defines):
        key = (name, defines)
        with self._lock:
            if key not in self._built:
                src = WORKLOAD_SRC / f"{name}.c"
                suffix = "".join("-" + re.sub(r"\W", "_", d) for d in defines)
                out = self.bindir / f"{name}{suffix}"
                cmd = ["gcc", "-O2", "-g", "-Wall", "-o", str(out), str(src)]
                cmd += [f"-D{d}" for d in defines] + self.FLAGS.get(name, [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                assert r.returncode == 0, f"building {name} failed:\n{r.stderr}"
                self._built[key] = out
            return self._built[key]


@pytest.fixture(scope="session")
def workloads(tmp_path_factory):
    return Workloads(tmp_path_factory.mktemp("bin"))


# --------------------------------------------------------------------------- process registry

class Registry:
    """Everything a test started, so that teardown can kill what is left: workloads (by
    process group), restored twins (by PID, with the PID namespace's init when there is one),
    agents."""

    def __init__(self):
        self.items = []  # psutil.Process, remembered with their start time

    def remember(self, pid, group=False):
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        # A restored process in a new PID namespace has that namespace's init as parent.
        try:
            parent = p.parent()
            ns = proc_status(parent.pid).get("NSpid", "").split() if parent is not None else []
            if len(ns) > 1 and ns[-1] == "1":  # an init, but not the host's
                self.items.append((parent, False))
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            pass
        self.items.append((p, group))

    def pids(self):
        return {p.pid for p, _ in self.items}

    def kill_all(self):
        for p, group in reversed(self.items):
            try:
                if not p.is_running():
                    continue
                if group:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                p.kill()
            except psutil.Error:
                pass
        # Gone or a zombie is enough: orphans' zombies are reaped by PID 1 in its own time.
        deadline = time.monotonic() + 10
        for p, _ in self.items:
            while time.monotonic() < deadline:
                try:
                    if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.Error:
                    break
                time.sleep(0.02)
        self.items.clear()


@pytest.fixture
def registry():
    reg = Registry()
    yield reg
    reg.kill_all()


# --------------------------------------------------------------------------- workloads at run time

class Workload:
    """One run of a workload program: argv is [exe, TRIGGER, DIR, *extra] for the C workloads
    (build it with `argv=`), stdout/stderr to files in DIR, stdin /dev/null."""

    def __init__(self, argv, directory, *, prefix=(), env=None, registry=None, name="workload"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.argv = [str(a) for a in argv]
        self.prefix = list(prefix)
        self.env = env
        self.registry = registry
        self.name = name
        self.proc = None
        self.stdout_path = self.dir / "stdout.txt"
        self.stderr_path = self.dir / "stderr.txt"

    @property
    def trigger_path(self):
        return self.dir / "trigger"

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.prefix + self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=self.dir, env=self.env, start_new_session=True, close_fds=True)
        if self.registry is not None:
            self.registry.remember(self.proc.pid, group=True)
        return self

    def stdout(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while "ready\n" not in self.stdout():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before `ready`; "
                            f"stdout={self.stdout()!r} stderr={self.stderr()!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not ready after {timeout} s; stdout={self.stdout()!r}")
            time.sleep(0.01)
        return self

    def fire(self):
        self.trigger_path.write_text("go\n")

    def wait_exit(self, timeout=120):
        """For a process that was never migrated (our child): its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} (pid {self.pid}) did not exit within {timeout} s; stdout={self.stdout()!r}")

    def file(self, name):
        return (self.dir / name).read_bytes()


def c_workload(workloads, name, directory, *extra, registry=None, prefix=(), env=None, defines=()):
    exe = workloads(name, *defines)
    directory = Path(directory)
    return Workload([exe, directory / "trigger", directory, *extra], directory, prefix=prefix, env=env,
                    registry=registry, name=name)


def reference_run(workload, timeout=120):
    """Run a never-migrated copy to the end: trigger right after `ready`. Returns the workload."""
    workload.start().wait_ready()
    workload.fire()
    rc = workload.wait_exit(timeout)
    assert rc == 0, f"reference run of {workload.name} exited with {rc}; stderr={workload.stderr()!r}"
    return workload


def assert_same_text(actual, expected, what):
    if actual != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                              f"{what} (never migrated)", f"{what} (migrated)", lineterm=""))
        pytest.fail(f"{what} differs from the run that was never migrated:\n{diff}")


def assert_same_output(migrated, reference, files=(), stderr=True):
    """stdout, stderr (unless told otherwise) and the named files of DIR are identical between
    the two runs."""
    assert_same_text(migrated.stdout(), reference.stdout(), f"{migrated.name} stdout")
    if stderr:
        assert_same_text(migrated.stderr(), reference.stderr(), f"{migrated.name} stderr")
    assert migrated.stdout().endswith("done\n"), f"{migrated.name} did not finish: {migrated.stdout()!r}"
    for name in files:
        a, b = migrated.file(name), reference.file(name)
        assert a == b, (f"{migrated.name}: {name} differs from the never-migrated run "
                        f"({len(a)} vs {len(b)} bytes, sha256 {hashlib.sha256(a).hexdigest()[:16]} vs "
                        f"{hashlib.sha256(b).hexdigest()[:16]})")


# --------------------------------------------------------------------------- agents

class Agent:
    """`umig agent` in a subprocess: its log lines are read in a thread."""

    def __init__(self, name, listen, *, prefix=(), workdir=None, registry=None):
        self.name = name
        self.listen = listen
        self.prefix = list(prefix)
        self.workdir = Path(workdir) if workdir else None
        self.registry = registry
        self.lines = []
        self._eof = False
        self._cond = threading.Condition()
        self.proc = None
        self.stderr_path = None

    # -- life cycle
    def start(self, timeout=60):
        cmd = self.prefix + umig_cmd("agent", "--listen", self.listen, "--name", self.name)
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.stderr_path = self.workdir / f"agent-{self.name}.stderr"
        else:
            self.stderr_path = Path(os.devnull)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                         env=umig_env(), cwd=REPO, start_new_session=True, text=True, bufsize=1)
        if self.registry is not None:
            self.registry.remember(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        first = self.wait_for_line(rf"^umig agent {re.escape(self.name)} listening on (\S+)", timeout, since=0)
        self.endpoint_shown = first[1]
        return self

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self):
        assert self.alive(), (f"agent {self.name} died (status {self.proc.returncode}); log:\n"
                              + "\n".join(self.lines) + f"\nstderr:\n{self.stderr()}")

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)
        self._save_log()

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._save_log()

    def _save_log(self):
        """Keep the log next to the agent's stderr, for a look after the test."""
        if self.workdir:
            (self.workdir / f"agent-{self.name}.log").write_text(self.log() + "\n")

    # -- log
    def mark(self):
        with self._cond:
            return len(self.lines)

    def log(self, since=0):
        with self._cond:
            return "\n".join(self.lines[since:])

    def wait_for_line(self, pattern, timeout=60, since=0):
        """The first log line from index `since` on matching `pattern` (a regex); fails on timeout
        or when the agent dies first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    m = rx.search(line)
                    if m:
                        return m
                if self._eof:
                    pytest.fail(f"agent {self.name} exited ({self.proc.returncode}) before logging /{pattern}/; "
                                f"log:\n{self.log()}\nstderr:\n{self.stderr()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"agent {self.name} did not log /{pattern}/ within {timeout} s; log:\n"
                                f"{self.log()}\nstderr:\n{self.stderr()}")
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, target_pid, timeout=120, since=0):
        """The outcome the agent logs for a restored process: ('status', N) or ('signal', NAME)."""
        m = self.wait_for_line(rf"^{re.escape(self.name)}: restored pid {target_pid} "
                               rf"(?:exited with status (\d+)|killed by (\S+))", timeout, since)
        return ("status", int(m[1])) if m[1] is not None else ("signal", m[2])

    def children(self):
        try:
            return [c for c in psutil.Process(self.proc.pid).children(recursive=True)
                    if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def target(self):
        return self.listen


@pytest.fixture
def agent_factory(tmp_path, registry):
    """Start extra agents inside a test: agent_factory(name, listen=None, prefix=())."""
    started = []

    def make(name, listen=None, prefix=()):
        listen = listen or f"tcp://127.0.0.1:{free_port()}"
        a = Agent(name, listen, prefix=prefix, workdir=tmp_path / "agents", registry=registry)
        started.append(a)
        return a.start()

    yield make
    for a in started:
        a.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """One agent on loopback for the whole module."""
    a = Agent("target", f"tcp://127.0.0.1:{free_port()}", workdir=tmp_path_factory.mktemp("agent"))
    a.start()
    yield a
    a.stop()


# --------------------------------------------------------------------------- migration helpers

def migrate(pid, target, *extra, netns=None, timeout=180):
    """`umig migrate PID TARGET --json`: must succeed; returns the JSON object."""
    r = run_umig("migrate", pid, target, "--json", *extra, netns=netns, timeout=timeout)
    assert r.returncode == 0, f"umig migrate {pid} {target} failed ({r.returncode}): {r.stderr.strip()}"
    try:
        info = json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"umig migrate --json printed something that is not one JSON object: {r.stdout!r}")
    for key in ("source_pid", "target", "target_pid", "pages", "bytes", "total_s", "frozen_s"):
        assert key in info, f"umig migrate --json lacks {key!r}: {info}"
    assert info["source_pid"] == pid
    return info


def nspid(pid):
    """The PIDs of a process from the host's PID namespace inward."""
    return [int(x) for x in proc_status(pid)["NSpid"].split()]


def _ancestors(p):
    out = set()
    with contextlib.suppress(psutil.Error):
        for a in p.parents():
            out.add(a.pid)
    return out


def leftovers(since, allowed=(), markers=(), pids=(), agents=()):
    """Processes started at or after `since` that look like a restore left behind: a restorer
    (by name or mapping) working for one of `pids` or below one of `agents` (other tests' or
    other users' restorers are none of our business), or anything mapping one of `markers`
    (e.g. the workload's executable) that is not in `allowed`. Zombies are ignored."""
    pids = {str(p) for p in pids}
    agents = set(agents)
    found = []
    for p in psutil.process_iter(["pid", "name", "create_time", "status", "cmdline"]):
        info = p.info
        if info["pid"] in allowed or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if info["create_time"] is None or info["create_time"] < since - 1:
            continue
        try:
            maps = read_maps(info["pid"])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        restorer = info["name"] == RESTORER_NAME or RESTORER_NAME in maps
        ours = (not pids and not agents) or (info["cmdline"] or [""])[-1] in pids or _ancestors(p) & agents
        if (restorer and ours) or any(str(m) in maps for m in markers):
            try:
                extra = f"state {proc_state(info['pid'])}, parent {p.ppid()}, {' '.join(p.cmdline())[:100]!r}"
            except psutil.Error:
                extra = "gone meanwhile"
            found.append(f"{info['pid']} ({info['name']}, {extra}, started {info['create_time'] - since:+.2f} s)")
    return found


def assert_no_leftovers(since, allowed=(), markers=(), pids=(), agents=(), timeout=10):
    """Give the target some seconds to clean up, then insist nothing of a restore remains."""
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(since, allowed, markers, pids, agents)
        if not found:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"left behind on the target: {', '.join(found)}"
                        + (f" (agents: {', '.join(map(str, agents))})" if agents else ""))
        time.sleep(0.1)


# --------------------------------------------------------------------------- network namespaces

class NetnsPair:
    def __init__(self):
        tag = "%06x" % random.randrange(1 << 24)
        self.a = f"umig-test-a-{tag}"
        self.b = f"umig-test-b-{tag}"
        self.veth_a = f"umva{tag}"
        self.veth_b = f"umvb{tag}"
        x, y = random.randrange(100, 250), random.randrange(1, 250)
        self.ip_a = f"10.{x}.{y}.1"
        self.ip_b = f"10.{x}.{y}.2"
        self.created = []

    def _ip(self, *args):
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def create(self):
        for ns in (self.a, self.b):
            self._ip("netns", "add", ns)
            self.created.append(ns)
        self._ip("link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b,
                 "netns", self.b)
        for ns, dev, ip in ((self.a, self.veth_a, self.ip_a), (self.b, self.veth_b, self.ip_b)):
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def remove(self):
        for ns in self.created:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


@pytest.fixture(scope="module")
def netns_pair():
    probe = f"umig-test-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` failed: {r.stderr.strip()})")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    pair = NetnsPair()
    try:
        pair.create()
    except RuntimeError:
        pair.remove()
        raise
    yield pair
    pair.remove()


# --------------------------------------------------------------------------- data files

def write_input_text(path, lines=3000):
    """A deterministic text file of about 100 kB (files workload)."""
    Path(path).write_text("".join(f"line {i:05d} " + "abcdefghij"[i % 10] * (i % 50) + "\n" for i in range(lines)))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

