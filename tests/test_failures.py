"""Failure injection: a migration that cannot complete must leave the source running exactly as
it was (its final output equals a run that was never migrated), report one clear line, and leave
nothing behind on the target."""
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (REPO, assert_clean_failure, assert_maps_equal, assert_no_leftovers, assert_running_untraced,
                      assert_same_output, c_workload, free_port, read_maps, reference_run, umig_cmd, umig_env,
                      write_input_text)


@pytest.fixture
def pair(workloads, registry, tmp_path):
    """pair(name, *extra, prepare=None, prefix=(), data=None) -> (reference Workload, started source
    Workload). Both start together; the reference is triggered at once and run to the end. With
    data="NAME" the workload's DIR argument is the subdirectory NAME (stdout and the trigger stay
    one level up); prepare(DIR) fills it."""
    def make(name, *extra, prepare=None, prefix=(), data=None):
        ref = c_workload(workloads, name, tmp_path / "ref", *extra, registry=registry, prefix=prefix)
        src = c_workload(workloads, name, tmp_path / "src", *extra, registry=registry, prefix=prefix)
        for w in (ref, src):
            if data:
                w.argv[2] = str(w.dir / data)
                (w.dir / data).mkdir()
            if prepare:
                prepare(Path(w.argv[2]))
        src.start()
        reference_run(ref)
        src.wait_ready()
        src.maps_at_ready = read_maps(src.pid)
        return ref, src
    return make


def finish_and_compare(src, ref, files=()):
    """The source was left running, untouched: same memory layout as before the attempt (nothing
    injected left behind); then it finishes like the reference."""
    assert_running_untraced(src.pid)
    assert_maps_equal(src.maps_at_ready, read_maps(src.pid), "after the failed migration")
    src.fire()
    rc = src.wait_exit(120)
    assert rc == 0, f"the source exited with {rc} after the failed migration; stderr={src.stderr()!r}"
    assert_same_output(src, ref, files)


def assert_target_clean(agent, since, registry, markers=(), source_pid=None):
    """No restorer working for the source or below the agent, no half-restored twin anywhere;
    the agent, if alive, without children."""
    assert_no_leftovers(since, allowed=registry.pids(), markers=markers,
                        pids=[source_pid] if source_pid else (), agents=[agent.proc.pid])
    if agent.alive():
        deadline = time.monotonic() + 10
        while agent.children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not agent.children(), f"agent {agent.name} still has children: {agent.children()}"


def migrate_expecting_failure(pid, target, *extra, timeout=120):
    r = subprocess.run(umig_cmd("migrate", pid, target, *extra), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, env=umig_env(), cwd=REPO, timeout=timeout)
    return assert_clean_failure(r, what="umig migrate")


# --------------------------------------------------------------------------- (a) agent dies

def migrate_killing_the_agent(victim, pid, *extra):
    """Migrate pid to the agent `victim` and SIGKILL the agent as soon as it announces the
    incoming process; returns umig migrate's one-line error."""
    mark = victim.mark()
    client = subprocess.Popen(umig_cmd("migrate", pid, victim.target(), *extra), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=umig_env(), cwd=REPO)
    try:
        victim.wait_for_line(rf"^victim: incoming pid {pid} ", 60, mark)
        victim.kill()
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
    return assert_clean_failure(subprocess.CompletedProcess(client.args, client.returncode, out, err),
                                what="umig migrate")


def test_agent_killed_mid_transfer(pair, agent_factory, registry):
    """SIGKILL the target agent as soon as it announces the incoming process (1 GiB resident,
    so the pages are still streaming)."""
    victim = agent_factory("victim")
    ref, src = pair("big", "1024")
    since = time.time()
    line = migrate_killing_the_agent(victim, src.pid)
    assert not any("restored as" in ln for ln in victim.lines), f"the agent finished before it was killed: {line}"
    assert_target_clean(victim, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    finish_and_compare(src, ref)


def test_client_killed_mid_transfer(pair, agent_factory, registry):
    """SIGKILL `umig migrate` itself mid-transfer: the source comes back by itself (its tracer
    is gone), the agent drops the half-built process and still serves the next migration."""
    target = agent_factory("survivor")
    ref, src = pair("big", "512")
    since = time.time()
    mark = target.mark()
    client = subprocess.Popen(umig_cmd("migrate", src.pid, target.target()), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=umig_env(), cwd=REPO)
    try:
        target.wait_for_line(rf"^survivor: incoming pid {src.pid} ", 60, mark)
        client.kill()
    finally:
        client.wait(30)
    # the agent notices that the source has gone (a ping to it fails) and cleans up
    target.wait_for_line(rf"^survivor: pid {src.pid} failed: ", 90, mark)
    assert_target_clean(target, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    target.assert_alive()
    finish_and_compare(src, ref)


# --------------------------------------------------------------------------- (a') the source refuses late

def test_source_refuses_its_final_state(pair, agent_factory, registry):
    """A live move whose process opens a pipe while its memory is copied: the final freeze
    refuses it, after the final layout went to the target (which is dropped), and the source
    goes on untouched."""
    target = agent_factory("final")
    ref, src = pair("big", "1024")
    since = time.time()
    mark = target.mark()
    client = subprocess.Popen(umig_cmd("migrate", src.pid, target.target(), "--live"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=umig_env(), cwd=REPO)
    try:
        target.wait_for_line(rf"^final: incoming pid {src.pid} ", 60, mark)
        os.kill(src.pid, signal.SIGUSR1)  # a GiB takes most of a second to copy: the pipe comes first
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
    line = assert_clean_failure(subprocess.CompletedProcess(client.args, client.returncode, out, err),
                                what="umig migrate")
    assert re.search(r"fd \d+: pipe", line), line
    target.wait_for_line(rf"^final: pid {src.pid} failed: ", 30, mark)
    assert_target_clean(target, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    finish_and_compare(src, ref)


# --------------------------------------------------------------------------- (b) a restorer step fails

def test_restorer_step_fails_rlimit(pair, agent_factory, registry):
    """The target agent runs under a lower hard RLIMIT_NOFILE than the source has; raising it
    needs CAP_SYS_RESOURCE, which nobody has here, so the restorer's rlimit step fails."""
    low = agent_factory("low-limits", prefix=["prlimit", "--nofile=1024:4096", "--"])
    ref, src = pair("memory", "4", prefix=["prlimit", "--nofile=1024:8192", "--"])
    since = time.time()
    mark = low.mark()
    line = migrate_expecting_failure(src.pid, low.target())
    assert "rlimit" in line.lower(), f"the error should name the failing step (rlimit): {line}"
    low.wait_for_line(rf"^low-limits: pid {src.pid} failed: .*rlimit", 30, mark)
    low.assert_alive()
    assert_target_clean(low, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    finish_and_compare(src, ref)


# --------------------------------------------------------------------------- (c) a file is missing there

def test_missing_file_on_target(pair, agent_factory, registry):
    """The target agent's mount namespace has an empty tmpfs over the directory of the files the
    source has open (input.txt, out.dat, log.txt): the restore fails naming one of them."""
    ref, src = pair("files", prepare=lambda d: write_input_text(d / "input.txt"), data="data")
    hide = src.argv[2]
    agent = agent_factory("no-files", prefix=["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                                              'mount -t tmpfs umig-test "$0" && exec "$@"', hide])
    assert os.listdir(f"/proc/{agent.proc.pid}/root{hide}") == [], "the tmpfs does not hide the directory"
    since = time.time()
    line = migrate_expecting_failure(src.pid, agent.target())
    assert re.search(re.escape(hide) + r"/(input\.txt|out\.dat|log\.txt)\b", line), (
        f"the error should name the missing file under {hide}: {line}")
    agent.assert_alive()
    assert_target_clean(agent, since, registry, markers=[src.argv[0]], source_pid=src.pid)
    finish_and_compare(src, ref, files=("data/out.dat", "data/log.txt"))


# --------------------------------------------------------------------------- (d) a different executable

def test_executable_differs_on_target(pair, agent_factory, registry, workloads):
    """The target sees another build of the program at the same path (bind mount in the agent's
    mount namespace): refused, naming the executable."""
    ref, src = pair("memory", "4")
    exe = str(src.argv[0])
    variant = workloads("memory", "VARIANT=1")
    agent = agent_factory("other-build", prefix=["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                                                 'mount --bind "$0" "$1" && shift && exec "$@"', str(variant), exe])
    since = time.time()
    line = migrate_expecting_failure(src.pid, agent.target())
    assert exe in line, f"the refusal should name the executable {exe}: {line}"
    agent.assert_alive()
    assert_target_clean(agent, since, registry, markers=[exe], source_pid=src.pid)
    finish_and_compare(src, ref)


# --------------------------------------------------------------------------- (e) nobody listens

def test_no_agent_listening(pair, registry):
    """A port where no agent listens: a quick, clear failure; the source never notices."""
    ref, src = pair("memory", "4")
    port = free_port()
    line = migrate_expecting_failure(src.pid, f"127.0.0.1:{port}", "--timeout", "10", timeout=60)
    assert str(port) in line, f"the error should name the endpoint: {line}"
    finish_and_compare(src, ref)


def test_target_is_not_an_agent(pair, registry):
    """Something that is not a umig agent answers on the port (it accepts, reads and says
    nothing): the migration gives up after --timeout with a clear message."""
    ref, src = pair("memory", "4")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def swallow():
        server.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                c, _ = server.accept()
                c.setblocking(False)
                conns.append(c)
            except OSError:
                pass
            for c in conns:
                try:
                    c.recv(65536)
                except OSError:
                    pass
        for c in conns:
            c.close()
    t = threading.Thread(target=swallow, daemon=True)
    t.start()
    try:
        migrate_expecting_failure(src.pid, f"127.0.0.1:{server.getsockname()[1]}", "--timeout", "3", timeout=60)
    finally:
        stop.set()
        t.join(5)
        server.close()
    finish_and_compare(src, ref)


# --------------------------------------------------------------------------- two at once

def test_two_migrations_at_once(workloads, registry, tmp_path, agent_factory):
    """Two sources migrate to one agent at the same time. Each either moves or is turned away
    with one clear line and goes on where it was; both finish like a run never migrated, and
    at least one of them moved."""
    target = agent_factory("busy")
    ref = reference_run(c_workload(workloads, "memory", tmp_path / "ref", "64", registry=registry))
    srcs = [c_workload(workloads, "memory", tmp_path / f"src{i}", "64", registry=registry).start() for i in (0, 1)]
    for src in srcs:
        src.wait_ready()
        src.maps_at_ready = read_maps(src.pid)
    mark = target.mark()
    clients = [subprocess.Popen(umig_cmd("migrate", src.pid, target.target(), "--json"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=umig_env(), cwd=REPO)
               for src in srcs]
    results = []
    for client in clients:
        try:
            out, err = client.communicate(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
        results.append(subprocess.CompletedProcess(client.args, client.returncode, out, err))
    moved = 0
    for src, result in zip(srcs, results):
        if result.returncode == 0:
            moved += 1
            tpid = json.loads(result.stdout)["target_pid"]
            registry.remember(tpid)
            src.wait_exit(30)
            src.fire()
            assert target.wait_exit(tpid, 120, mark) == ("status", 0)
            assert_same_output(src, ref)
        else:
            assert_clean_failure(result, what="the migration that was turned away")
            finish_and_compare(src, ref)
    assert moved >= 1, f"neither migration went through: {[r.stderr.strip() for r in results]}"
    target.assert_alive()
