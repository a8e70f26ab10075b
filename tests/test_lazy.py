"""Post-copy ("lazy") migration: the process runs on the target at once, its memory follows on
demand (userfaultfd) and in the background. Checked like every migration (output equal to a run
never migrated, same layout, exit 0: see test_live.py), with a writer that touches its pages in random order, and
with failures before the process resumes and while its pages are still coming."""
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import (alive, assert_maps_equal, assert_same_output, c_workload, migrate, proc_state, read_maps,
                      reference_run, umig_cmd, umig_env, wait_until)
from umig import dump, postcopy, precopy, procfs
from umig.procfs import PAGE_SIZE
from umig.state import memory
from test_failures import (assert_target_clean, finish_and_compare, migrate_expecting_failure,  # noqa: F401
                           migrate_killing_the_agent, pair)
from test_live import assert_writer_exact

SMALL_WRITER_MIB = "32"
from test_migrate import c_make, migrate_and_compare  # noqa: F401  (fixture)


def test_lazy_writer_touching_pages_in_random_order(agent, registry, workloads, tmp_path):
    # Small enough for its working set to be learnt (postcopy.WORKING_SET_WATCH_LIMIT).
    wl = c_workload(workloads, "live_writer", tmp_path / "mig", SMALL_WRITER_MIB, registry=registry)
    wl.start().wait_ready()
    maps_before = read_maps(wl.pid)
    since = agent.mark()
    info = migrate(wl.pid, agent.target(), "--lazy")
    registry.remember(info["target_pid"])
    # What it wrote while the target prepared went ahead of the resume, not on demand.
    assert info["working_set_pages"] > 0
    assert isinstance(info["postcopy_faults"], int) and info["postcopy_faults"] >= 0, info
    assert_maps_equal(maps_before, read_maps(info["target_pid"]))
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 0)
    assert_writer_exact(workloads, wl.stdout(), SMALL_WRITER_MIB)


def test_small_mappings_go_before_the_resume(workloads, registry, tmp_path):
    """Of a real process's memory, the pages of anonymous mappings no larger than a fault's prefetch
    go with the eager pages (their first fault would bring them whole); larger ones are lazy."""
    wl = c_workload(workloads, "memory", tmp_path / "w", "4", registry=registry).start().wait_ready()
    frozen = dump.freeze(wl.pid)
    try:
        state, runs = dump.collect(frozen)
    finally:
        frozen.thaw()
    eager, lazy = postcopy.split(state, runs)
    anonymous = [m for m in state["memory"]["mappings"] if m["kind"] in postcopy.LAZY_KINDS and m["pages"]]
    small = [m for m in anonymous if m["end"] - m["start"] <= postcopy.PREFETCH_PAGES * PAGE_SIZE]
    assert small and len(small) < len(anonymous), anonymous
    for m in anonymous:
        span = [[m["start"], m["end"] - m["start"]]]
        if m in small:
            assert not memory.intersect(lazy, span) and memory.intersect(eager, span), m
        else:
            assert memory.intersect(lazy, span), m


@pytest.mark.parametrize("mib, whole", [("1", True), ("8", False)])
def test_mappings_around_written_pages_go_ahead(workloads, registry, tmp_path, mib, whole):
    """An anonymous mapping of at most NEIGHBOURHOOD_LIMIT holding a page written since the first
    state goes ahead whole (what a process reads first lies near what it writes); a larger one
    does not. Looking at the written pages leaves them for the final scan, which resets them."""
    wl = c_workload(workloads, "live_writer", tmp_path / "w", mib, registry=registry).start().wait_ready()
    frozen = dump.freeze(wl.pid)
    try:
        state, _ = dump.collect(frozen)
        frozen.tracker = precopy.WriteTracker(frozen, state["memory"], postcopy.tracked_kinds(state["memory"]))
        frozen.tracker.start()
        frozen.run()
        time.sleep(0.05)  # it writes its region meanwhile
        frozen.stop()
        looked = frozen.tracker.written(again=False)
        assert looked and frozen.tracker.written(again=False) == looked
        region = next(m for m in state["memory"]["mappings"]
                      if m["kind"] == "anon" and m["end"] - m["start"] >= int(mib) << 20)
        span = [[region["start"], region["end"] - region["start"]]]
        assert memory.intersect(looked, span), "no write seen in the region"
        present = memory.present_runs(wl.pid, state["memory"]["mappings"])
        ahead = postcopy.neighbourhoods(state, present, looked)
        assert memory.intersect(ahead, span) == (memory.intersect(present, span) if whole else [])
        assert sum(length for _, length in memory.intersect(present, span)) >= (int(mib) << 20) * 15 // 16
        assert frozen.tracker.written() == looked and frozen.tracker.written() == []
    finally:
        frozen.thaw()


@pytest.mark.parametrize("mode", ["lazy", "live"])
def test_restore_fails_at_the_final_state(pair, agent_factory, registry, mode):
    """A restorer step fails once the final state has come (before a lazy process resumes; in
    the final freeze of a live one, its write tracker still armed): the source goes on untouched,
    without the tracker (same fds, same layout)."""
    low = agent_factory("low-limits", prefix=["prlimit", "--nofile=1024:4096", "--"])
    ref, src = pair("memory", "4", prefix=["prlimit", "--nofile=1024:8192", "--"])
    fds_before = sorted(os.listdir(f"/proc/{src.pid}/fd"))
    since = time.time()
    line = migrate_expecting_failure(src.pid, low.target(), f"--{mode}")
    assert "rlimit" in line.lower(), line
    low.assert_alive()
    assert_target_clean(low, since, registry, markers=[src.argv[0]])
    assert sorted(os.listdir(f"/proc/{src.pid}/fd")) == fds_before, "the tracking userfaultfd was left behind"
    finish_and_compare(src, ref)


def test_lazy_agent_killed_between_first_and_final_state(pair, agent_factory, registry):
    """The agent dies once it has laid out the first state: the source, running again and traced
    while it waited, is frozen for its final state or about to be; either way it goes on
    untouched and finishes like a run never migrated."""
    victim = agent_factory("victim")
    ref, src = pair("big", "256")
    since = time.time()
    migrate_killing_the_agent(victim, src.pid, "--lazy")
    assert_target_clean(victim, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    finish_and_compare(src, ref)


def test_lazy_source_lost_during_postcopy(agent_factory, registry, workloads, tmp_path):
    """`umig migrate` dies while pages are still coming: the target cannot go on, so the agent
    kills the half-arrived process and says so; the source, no longer traced, resumes from where
    it was frozen and its memory is still exactly its own."""
    target = agent_factory("stranded")
    src = c_workload(workloads, "live_writer", tmp_path / "src", "1024", registry=registry)
    src.start().wait_ready()
    fds_before = sorted(os.listdir(f"/proc/{src.pid}/fd"))
    mark = target.mark()
    client = subprocess.Popen(umig_cmd("migrate", src.pid, target.target(), "--lazy"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=umig_env())
    m = target.wait_for_line(rf"^stranded: pid {src.pid} running as (\d+); post-copy", 60, mark)
    client.kill()
    client.wait(30)
    target.wait_for_line(rf"^stranded: pid {src.pid} failed: the source was lost during post-copy", 60, mark)
    wait_until(lambda: not alive(int(m[1])), 30, "the stranded process to be killed")
    target.assert_alive()
    assert sorted(os.listdir(f"/proc/{src.pid}/fd")) == fds_before, "the working-set tracker's userfaultfd was left behind"
    src.fire()
    assert src.wait_exit(60) == 0
    assert_writer_exact(workloads, src.stdout(), "1024")


def test_lazy_source_lost_after_the_process_forked(agent_factory, registry, workloads, tmp_path):
    """`umig migrate` dies while pages are still coming to a process that has forked children
    on the target: the children's memory would never be whole either, and they are killed with
    it. The source, thawed, goes on."""
    target = agent_factory("stranded")
    src = c_workload(workloads, "forker", tmp_path / "src", "1024", "waits", registry=registry)
    src.start().wait_ready()
    mark = target.mark()
    # --pid any: no PID namespace, whose end would take the children along anyway.
    client = subprocess.Popen(umig_cmd("migrate", src.pid, target.target(), "--lazy", "--pid", "any"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=umig_env())
    restored = int(target.wait_for_line(rf"^stranded: pid {src.pid} running as (\d+); post-copy", 60, mark)[1])
    registry.remember(restored)
    family = []
    wait_until(lambda: family.__setitem__(slice(None), psutil.Process(restored).children(recursive=True))
               or len(family) == 2, 30, "the restored process's child and grandchild")
    client.kill()
    client.wait(30)
    target.wait_for_line(rf"^stranded: pid {src.pid} failed: the source was lost during post-copy", 60, mark)
    wait_until(lambda: not any(alive(p.pid) for p in family) and not alive(restored), 30,
               "the stranded process and its children to be killed")
    target.assert_alive()
    src.fire()
    assert src.wait_exit(60) == 0


def test_lazy_job_control_stop_during_postcopy_is_kept(agent, registry, workloads, tmp_path):
    """SIGSTOP while pages are still coming: the process is still stopped once all have come,
    and goes on correctly after SIGCONT."""
    wl = c_workload(workloads, "live_writer", tmp_path / "mig", "2048", registry=registry)
    wl.start().wait_ready()
    since = agent.mark()
    client = subprocess.Popen(umig_cmd("migrate", wl.pid, agent.target(), "--lazy", "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=umig_env())
    m = agent.wait_for_line(rf"^{agent.name}: pid {wl.pid} running as (\d+); post-copy", 60, since)
    target = int(m[1])
    registry.remember(target)
    os.kill(target, signal.SIGSTOP)
    time.sleep(0.3)
    state = proc_state(target)
    assert client.poll() is None, "post-copy ended too soon to see the process stay stopped during it"
    assert state in ("t", "T"), f"the process ran on during post-copy although SIGSTOP stopped it (state {state})"
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    wait_until(lambda: proc_state(target) == "T", 10, "the restored process to show the job-control stop")
    time.sleep(0.5)
    assert proc_state(target) == "T", "the stopped process ran on after post-copy"
    os.kill(target, signal.SIGCONT)
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(target, 60, since) == ("status", 0)
    assert_writer_exact(workloads, wl.stdout(), "2048")



@pytest.mark.parametrize("when, news", [("resumed", "executed another program during post-copy"),
                                        ("ends", r"ended during post-copy \(exited with status 0\)")])
def test_lazy_it_leaves_its_memory_while_its_pages_arrive(agent, registry, c_make, when, news):
    """Resumed on the target, the process at once executes a program (itself again), or ends,
    while its memory is still arriving: the pages still to come have nowhere to go, and that is
    no failure. It goes on, or ends, as in a run never moved."""
    make = c_make("execer", when, "128")
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    since = agent.mark()
    info = migrate(wl.pid, agent.target(), "--lazy")
    registry.remember(info["target_pid"])
    agent.wait_for_line(rf"^{agent.name}: restored pid {info['target_pid']} {news}", 30, since)
    wl.wait_exit(30)
    wl.fire()
    if when == "resumed":
        assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 0)
    assert_same_output(wl, ref)


@pytest.mark.parametrize("family", ["waits", "leaves", "staggered"])
def test_lazy_children_forked_while_its_pages_arrive(agent, registry, c_make, family):
    """Resumed on the target, the process at once forks a child, which forks a grandchild, all
    while its memory is still arriving: their copies of the pages still missing arrive too (the
    kernel would fill them with zeros). Or the process ends at once, as a daemon's first process
    does, and its child, which sums the memory, still gets every page. Or it forks eight
    children over 90 ms, some while a record is being placed."""
    make = c_make("forker", "512" if family == "staggered" else "128", family)  # staggered: the stream outlasts them
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    since = agent.mark()
    info = migrate(wl.pid, agent.target(), "--lazy")
    registry.remember(info["target_pid"])
    forked = agent.wait_for_line(rf"^{agent.name}: restored pid {info['target_pid']} \(or a child of its\) forked "
                                 r"during post-copy: (\d+) processes", 30, since)
    if family == "staggered":  # as many as came before the last page
        assert int(forked[1]) >= 2, forked[0]
    else:
        assert int(forked[1]) == {"waits": 2, "leaves": 1}[family], forked[0]
    # The family waits for the trigger, untraced again (a traced one would stop at its next signal).
    assert not procfs.traced_by(agent.proc.pid), "processes of the move are still traced by the agent"
    wl.wait_exit(30)
    wl.fire()
    if family != "leaves":
        assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 0)
        assert_same_output(wl, ref)
    else:
        for run in (wl, ref):
            wait_until(lambda: (run.dir / "child.txt").exists(), 30, f"the {run.name} child's sum")
        assert_same_output(wl, ref, files=("child.txt",))


@pytest.mark.parametrize("mode", ["lazy", "live"])
def test_descriptors_opened_while_the_target_prepares(agent, registry, c_make, mode):
    """The process opens descriptors between the first and the final state: the restorer's own
    channel, parked above the first state's descriptors, must not be in their way."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("opener"), extra=(f"--{mode}",))
    assert "descriptors: all open" in wl.stdout()
