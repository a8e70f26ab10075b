"""The scheduler with real agents, real processes and real migrations: a job moved round a
ring of three nodes still reports home and keeps its CPU age; the memory policy moves a job
off a node whose memory cgroup runs short; the eligibility rules offer what matches and never
move anything else; and a live `umig top` redraws and shows a migration between two other
nodes as it happens."""
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from conftest import alive, free_port, umig_cmd, umig_env, wait_until
from test_cluster import cluster_agent, emulated_ok, nodes  # noqa: F401 (emulated_ok is a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from emulation import EmulatedCluster  # noqa: E402

MiB = 2**20

# A plug-in policy that proposes every eligible process, each to the next node by name: it
# moves whatever it is offered, so what moves shows what was offered.
RING = '''
from umig.policies import Policy, eligible, proposal


class Ring(Policy):
    name = "ring"

    def decide(self, view):
        names = sorted(view.nodes)
        if len(names) < 2:
            return []
        target = view.nodes[names[(names.index(view.local) + 1) % len(names)]]
        return [proposal(view.me, p, target, "next in the ring") for p in eligible(view.me)]
'''

# Agents on loopback all see the same host's load, so the load hysteresis would refuse every
# move; the other guards only slow the ring down.
RING_GUARDS = ("--guard", "hysteresis=-100", "--guard", "node_interval=0", "--guard", "process_interval=1")


@pytest.fixture
def ring_policy(tmp_path):
    path = tmp_path / "ring.py"
    path.write_text(RING)
    return f"{path}:Ring"


@pytest.fixture
def make_emulated(emulated_ok):  # noqa: F811
    made = []

    def make(capacities, memory_limits=None):
        cluster = EmulatedCluster(capacities, memory_limits=memory_limits)
        made.append(cluster)
        try:
            return cluster.create()
        except (RuntimeError, OSError) as e:
            pytest.skip(f"cannot build emulated nodes here: {e}")

    yield make
    for cluster in made:
        cluster.remove()


def start_in_netns(netns, *umig_args, cwd):
    return subprocess.Popen(["ip", "netns", "exec", netns, *umig_cmd(*umig_args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=umig_env(), cwd=cwd)


def finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --------------------------------------------------------------------------- a job round a ring

SPINNER = """
import os, sys
total = turns = 0
while not os.path.exists(sys.argv[1]):
    for _ in range(10000):
        total += turns
        turns += 1
print("turns", turns, "total", total, flush=True)
sys.exit(5)
"""

ADOPTED = r"^{}: job node-a\.1 runs here as pid (\d+) \(CPU age ([\d.]+) s\)"


def test_a_job_moved_round_a_ring_reports_home_with_its_cpu_age(agent_factory, ring_policy, tmp_path):
    """node-a -> node-b -> node-c -> node-a and on: each node takes the CPU age the job brought,
    more at every hop, and `umig run`, waiting at node-a, gets the job's output and status."""
    names = ("node-a", "node-b", "node-c")
    endpoints = {n: f"tcp://127.0.0.1:{free_port()}" for n in names}
    agents = {n: cluster_agent(agent_factory, n, ep, [p for m, p in endpoints.items() if m != n],
                               "--balance", ring_policy, *RING_GUARDS) for n, ep in endpoints.items()}
    for n, agent in agents.items():
        for peer in names:
            if peer != n:
                agent.wait_for_line(rf"^{n}: node {peer} (joined|is back)", 30)
    script, stop = tmp_path / "spin.py", tmp_path / "stop"
    script.write_text(SPINNER)
    run = subprocess.Popen(umig_cmd("run", "--agent", endpoints["node-a"], "--", sys.executable, script, stop),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=umig_env(), cwd=tmp_path)
    try:
        ages = [float(agents[n].wait_for_line(ADOPTED.format(re.escape(n)), 90)[2])
                for n in ("node-b", "node-c", "node-a")]
    finally:  # the job ends wherever it is, and `umig run` at node-a reports it
        stop.write_text("stop\n")
        out, err = finish(run, 90)
    logs = "\n".join(a.log() for a in agents.values())
    # The CPU age grows at every hop: what the job used on the last node is added to what it brought.
    assert ages[0] > 0 and all(later > earlier + 0.05 for earlier, later in zip(ages, ages[1:])), f"{ages}\n{logs}"
    assert run.returncode == 5, f"status {run.returncode}; stderr={err!r}\n{logs}"
    m = re.fullmatch(r"turns (\d+) total (\d+)\n", out)
    assert m and int(m[2]) == int(m[1]) * (int(m[1]) - 1) // 2, f"output {out!r}"
    assert len(re.findall(r"balance: migrated pid \d+ to node-\w", logs)) >= 3, logs


# --------------------------------------------------------------------------- memory pressure

HOG = """
import os, sys, time
hog = bytearray(int(sys.argv[1]) << 20)
for page in range(0, len(hog), 4096):
    hog[page] = 1
print("allocated", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print("pages", sum(hog[::4096]), flush=True)
sys.exit(3)
"""


def test_memory_policy_moves_a_job_off_a_node_short_of_memory(make_emulated, agent_factory, tmp_path):
    """node-a is a memory cgroup of 400 MiB; a job there allocates 200 MiB. Free memory falls
    below half of the node's, so the memory policy sends the job to node-b, which has the
    host's memory; the node-a cgroup is relieved and the job's output and status reach home."""
    limit, hog = 400 * MiB, 200
    cluster = make_emulated([1.0, 1.0], memory_limits=[limit, None])
    a, b = (agent_factory(name, ep, prefix=cluster.agent_prefix(
        i, *cluster.peers_of(i), "--interval", "0.3", "--balance", "memory", "--balance-opt", "low=0.5"))
        for i, (name, ep) in enumerate(zip(cluster.names, cluster.endpoints)))
    a.wait_for_line(r"^node-a: node node-b joined", 30)
    me = nodes(a, cluster.netns[0])["nodes"]["node-a"]
    assert me["mem_total"] == limit and me["mem_free"] > limit / 2, me  # the node is its memory cgroup
    script, stop = tmp_path / "hog.py", tmp_path / "stop"
    script.write_text(HOG)
    run = start_in_netns(cluster.netns[0], "run", "--agent", cluster.endpoints[0], "--", sys.executable, script, hog,
                         stop, cwd=tmp_path)
    try:
        moving = a.wait_for_line(r"^node-a: balance: moving pid \d+ \(job node-a\.1\) to node-b: policy memory: "
                                 r"free memory (\d+) MiB < 0\.5 of 400 MiB", 60)
        assert int(moving[1]) < 200
        a.wait_for_line(r"^node-a: balance: migrated pid \d+ to node-b", 60)
        b.wait_for_line(r"^node-b: job node-a\.1 runs here", 30)
        with open(os.path.join(cluster.cgroup("memory", 0), "memory.usage_in_bytes")) as f:
            assert int(f.read()) < limit - hog * MiB, "node-a's memory cgroup still holds the job's memory"
    finally:
        stop.write_text("stop\n")
        out, err = finish(run, 60)
    assert (run.returncode, out) == (3, f"allocated\npages {hog * MiB // 4096}\n"), (run.returncode, out, err,
                                                                                   a.log(), b.log())


# --------------------------------------------------------------------------- eligibility rules

NOBODY = 65534


def test_eligibility_rules_offer_what_matches_and_never_move_the_rest(make_emulated, agent_factory, ring_policy,
                                                                     registry):
    """node-a makes eligible the processes of uid 0 named `elig-*` in a cgroup whose path holds
    our tag, and proposes everything it is offered. Of four sleepers in node-a, the one
    that matches every rule moves; each of the others fails one rule and stays where it is."""
    cluster = make_emulated([1.0, 1.0])
    pids_cgroup = Path("/sys/fs/cgroup/pids") / f"umig-elig-{cluster.tag}"
    pids_cgroup.mkdir()
    binaries = Path(tempfile.mkdtemp(prefix="umig-elig-"))
    sleepers = {}
    try:
        binaries.chmod(0o755)  # uid 65534 must reach the programs
        for name in ("elig-sleep", "other-sleep"):
            (binaries / name).symlink_to("/bin/sleep")  # a process's name is the name it was run by

        def sleeper(name, uid, tagged):
            def enter():
                joins = [Path(cluster.cgroup(c, 0)) for c in cluster.cgroups] + ([pids_cgroup] if tagged else [])
                for directory in joins:
                    (directory / "cgroup.procs").write_text(str(os.getpid()))
                if uid:
                    os.setuid(uid)
            return subprocess.Popen([binaries / name, "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd="/", preexec_fn=enter)

        sleepers = {"match": sleeper("elig-sleep", 0, True), "wrong name": sleeper("other-sleep", 0, True),
                    "wrong uid": sleeper("elig-sleep", NOBODY, True), "wrong cgroup": sleeper("elig-sleep", 0, False)}
        a = agent_factory("node-a", cluster.endpoints[0], prefix=cluster.agent_prefix(
            0, *cluster.peers_of(0), "--interval", "0.3", "--balance", ring_policy, *RING_GUARDS,
            "--eligible-uid", 0, "--eligible-name", "elig-*", "--eligible-cgroup", f"umig-elig-{cluster.tag}"))
        agent_factory("node-b", cluster.endpoints[1], prefix=cluster.agent_prefix(1, *cluster.peers_of(1),
                                                                                  "--interval", "0.3"))
        moved = a.wait_for_line(rf"^node-a: balance: migrated pid {sleepers['match'].pid} to node-b as pid (\d+)", 60)
        registry.remember(int(moved[1]))
        time.sleep(2)  # several more decisions, with nothing in the way of another move
        offered = {p["pid"] for p in nodes(a, cluster.netns[0])["nodes"]["node-a"]["processes"]}
        log = a.log()
        for what, proc in sleepers.items():
            if what == "match":
                continue
            assert alive(proc.pid) and proc.pid not in offered, f"{what}: pid {proc.pid}\n{log}"
            assert not re.search(rf"moving pid {proc.pid}\b", log), f"{what}: pid {proc.pid} was moved\n{log}"
    finally:
        for proc in sleepers.values():
            proc.kill()
            proc.wait()
        for name in ("elig-sleep", "other-sleep"):
            (binaries / name).unlink(missing_ok=True)
        binaries.rmdir()
        wait_until(lambda: not (pids_cgroup / "cgroup.procs").read_text().strip(), 10, "the tagged cgroup to empty")
        pids_cgroup.rmdir()


# --------------------------------------------------------------------------- umig top, live

FRAME = "\x1b[H\x1b[2J"


def test_live_top_redraws_and_shows_a_migration_elsewhere_in_the_cluster(agent_factory, ring_policy, registry):
    """`umig top` on a pseudo-terminal, watching node-b, while node-a sends node-b a job: the
    move (from, to, frozen time) appears in a later frame, though node-b did not send it."""
    a_ep, b_ep = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    a = cluster_agent(agent_factory, "node-a", a_ep, [b_ep], "--balance", ring_policy, *RING_GUARDS)
    b = cluster_agent(agent_factory, "node-b", b_ep, [a_ep])
    b.wait_for_line(r"^node-b: node node-a joined", 30)
    master, slave = pty.openpty()
    # A wide terminal, so that no line is cut.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    top = subprocess.Popen(umig_cmd("top", "--agent", b_ep, "--interval", "0.3"), stdin=slave, stdout=slave,
                           stderr=slave, env=umig_env(), start_new_session=True)
    os.close(slave)
    screen = ""

    def frames():
        return [f for f in screen.split(FRAME) if f.strip()]

    def read_for(seconds):
        nonlocal screen
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    screen += os.read(master, 65536).decode(errors="replace")
                except OSError:  # the terminal's other side has closed: top has ended
                    break
    move = re.compile(r"pid \d+ node-a -> node-b done as pid (\d+), frozen [\d.]+ s of [\d.]+ s")
    try:
        read_for(1.0)
        first = len(frames())
        assert first >= 1 and not move.search(screen), screen
        job = subprocess.run(umig_cmd("run", "--agent", a_ep, "--detach", "--", "sleep", "60"), capture_output=True,
                             text=True, env=umig_env(), timeout=30)
        assert job.returncode == 0, job.stderr
        deadline = time.monotonic() + 30
        while not move.search(screen) and time.monotonic() < deadline and top.poll() is None:
            read_for(0.5)
        seen = move.search(screen)
        assert seen, f"no migration shown after {len(frames())} frames; top's last frame:\n{frames()[-1:]}"
        registry.remember(int(seen[1]))
        # Each frame is redrawn whole: the one showing the move also shows both nodes.
        showing = next(f for f in frames() if move.search(f))
        assert "node-a " in showing and "node-b " in showing, showing
        assert re.search(r"node-a -> node-b moving \(ring: next in the ring\)", screen), screen
    finally:
        os.killpg(top.pid, signal.SIGTERM)
        top.wait(10)
        os.close(master)
    assert a.alive() and b.alive()
