"""Live (pre-copy) migration: memory copied while the process runs, then a short freeze; and
the core workloads under both pre-copy and post-copy (test_lazy.py has post-copy's own tests).

Checked as for stop-and-copy (output equal to a run never migrated, same memory layout, exit 0),
plus a writer that dirties memory as fast as it can during the copy: the steps it counted and a
hash of its whole region must equal a replay of that many steps in a process never migrated.
"""
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import (assert_maps_equal, assert_same_output, c_workload, migrate, proc_state, read_maps, reference_run,
                      umig_cmd, umig_env, wait_until, write_input_text)
from umig import dump, precopy, procfs
from umig.demo import compile_c
from umig.errors import Refused
from umig.state import memory
from test_failures import assert_target_clean, migrate_expecting_failure
from test_migrate import c_make, migrate_and_compare  # noqa: F401  (fixture)

WRITER_MIB = "256"


def assert_writer_exact(workloads, stdout, mib=WRITER_MIB):
    """The writer's steps and hash equal those of a never-migrated writer replaying as many steps."""
    steps, digest = re.fullmatch(r"ready\nsteps (\d+) hash (\w+)\n", stdout).groups()
    replay = subprocess.run([workloads("live_writer"), "--replay", steps, mib], capture_output=True,
                            text=True, check=True)
    assert replay.stdout == f"steps {steps} hash {digest}\n", (
        f"the writer's memory is not what {steps} steps make: a write was lost, stale or came wrong")


@pytest.mark.parametrize("mode", ["live", "lazy"])
@pytest.mark.parametrize("name", ["memory", "registers", "signals", "sleeper", "files"])
def test_workloads(agent, registry, c_make, name, mode):
    """Every core workload, moved by pre-copy and by post-copy."""
    prepare = (lambda d: write_input_text(d / "input.txt")) if name == "files" else None
    files = ("out.dat", "log.txt", "new.dat") if name == "files" else ()
    _, _, info = migrate_and_compare(agent, registry, c_make(name), extra=(f"--{mode}",), prepare=prepare,
                                     files=files)
    assert info["mode"] == mode, f"not a {mode} migration: {info}"


@pytest.mark.parametrize("tracking", ["userfaultfd", "hashes"])
def test_live_writer_loses_no_write(agent, registry, workloads, tmp_path, tracking):
    wl = c_workload(workloads, "live_writer", tmp_path / "mig", WRITER_MIB, registry=registry)
    wl.start().wait_ready()
    maps_before = read_maps(wl.pid)
    since = agent.mark()
    info = migrate(wl.pid, agent.target(), "--live", "--tracking", tracking)
    registry.remember(info["target_pid"])
    assert info["tracking"] == {"userfaultfd": "userfaultfd", "hashes": "page hashes"}[tracking], info
    assert info["rounds_ended"] in ("small enough", "not shrinking", "round limit"), info
    assert len(info["rounds"]) >= 2, f"the writer should have needed more than one round: {info}"
    assert_maps_equal(maps_before, read_maps(info["target_pid"]))
    assert not any("userfaultfd" in os.readlink(f"/proc/{info['target_pid']}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{info['target_pid']}/fd")), "the tracking userfaultfd moved along"
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 0)
    assert_writer_exact(workloads, wl.stdout())


def test_live_target_killed_during_precopy(agent_factory, registry, workloads, tmp_path):
    """The target agent dies while memory is copied: the source goes on as if nothing happened
    (no tracker left: same fds, same layout) and its memory is still exactly its own."""
    victim = agent_factory("victim")
    src = c_workload(workloads, "live_writer", tmp_path / "src", WRITER_MIB, registry=registry)
    src.start().wait_ready()
    maps_before, fds_before = read_maps(src.pid), sorted(os.listdir(f"/proc/{src.pid}/fd"))
    mark = victim.mark()
    client = subprocess.Popen(umig_cmd("migrate", src.pid, victim.target(), "--live"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=umig_env())
    victim.wait_for_line(rf"^victim: incoming pid {src.pid} ", 60, mark)
    victim.kill()
    out, err = client.communicate(timeout=120)
    assert client.returncode != 0 and err.startswith("umig: ") and "Traceback" not in err, (out, err)
    assert_maps_equal(maps_before, read_maps(src.pid), "after the failed live migration")
    assert sorted(os.listdir(f"/proc/{src.pid}/fd")) == fds_before, "the tracking userfaultfd was left behind"
    src.fire()
    assert src.wait_exit(60) == 0
    assert_writer_exact(workloads, src.stdout())


@pytest.mark.parametrize("mode", ["stop", "live", "lazy"])
def test_neighbours_the_kernel_kept_apart_stay_apart(agent, registry, c_make, mode):
    """Two anonymous mappings side by side that the kernel did not merge (mremap moved one
    there) are two mappings after the move too, whatever the mode (the maps comparison)."""
    extra = () if mode == "stop" else (f"--{mode}",)
    wl, _, _ = migrate_and_compare(agent, registry, c_make("apart"), extra=extra)
    assert "lower: 0 bad bytes, upper: 0 bad bytes" in wl.stdout()


@pytest.mark.parametrize("mode", ["live", "lazy"])
def test_a_file_it_writes_grows_while_the_target_prepares(agent, registry, c_make, mode):
    """The first state's files are looked at on the target while the process still runs: a log
    it appends to every millisecond has grown by then. That is no reason to refuse (the final
    state's check, of the frozen process, is the one that counts), and no line goes missing."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("appender"), extra=(f"--{mode}",))
    assert "appended lines: all, in order" in wl.stdout()


@pytest.mark.parametrize("mode", ["live", "lazy"])
def test_a_file_it_writes_through_a_shared_mapping_changes_meanwhile(agent, registry, c_make, mode):
    """A file mapped shared and written back every millisecond changes its mtime while the
    target looks at the first state: the final state's check, of the frozen process, is the
    one that counts for its size and times, as for the files it has open."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("mapwriter"), extra=(f"--{mode}",))
    assert "mapped counter: the last one stored" in wl.stdout()


@pytest.mark.parametrize("mode", ["live", "lazy"])
def test_mapping_replaced_during_the_copy(agent, registry, c_make, mode):
    """A mapping unmapped and mapped again, new contents each time, while memory is copied: the
    tracker loses it (pre-copy) or hears it go (post-copy), and it arrives whole and current."""
    wl, _, _ = migrate_and_compare(agent, registry, c_make("remapper"), extra=(f"--{mode}",))
    assert "remapped region: one generation" in wl.stdout()


def test_final_pages_drop_what_a_kept_mapping_lost():
    """A mapping replaced during the rounds (mmap over it: the tracker loses it) that has the
    same geometry as before, so the target keeps it: its pages sent before and absent now must
    be dropped there, or they would keep an older generation where the process reads zeros."""
    m = {"start": 0x100000, "end": 0x104000, "prot": 3, "shared": False, "offset": 0, "kind": "anon", "path": "",
         "vmflags": [], "pages": 4}
    sent_before, present_now = [[0x100000, 0x4000]], [[0x100000, 0x1000]]
    for lost in (set(), {memory.same_mapping(m)}):
        send, discard = precopy.final_pages({"mappings": [m]}, {"mappings": [dict(m, pages=1)]}, [], present_now,
                                            [m], lost, sent_before)
        assert discard == [[0x101000, 0x3000]], (lost, discard)
        assert send == (present_now if lost else []), (lost, send)


def test_a_dropped_copy_of_a_file_page_is_sent_again(tmp_path, registry):
    """A copied page of a private file mapping that the process drops while the tracker watches
    comes back as the file's page, leaving a write-protect marker that PAGEMAP_SCAN reports as
    swapped, never written: the tracker reports it, so the target's stale copy is replaced."""
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 16 * 16)
    dropper = compile_c(r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char *p = mmap(0, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, open(argv[1], O_RDONLY), 0);
    for (int i = 0; i < 4; i++) p[i * 4096] = 'x';
    printf("%p\n", p); fflush(stdout);
    char b;
    read(0, &b, 1);
    madvise(p + 4096, 4096, MADV_DONTNEED);
    printf("dropped\n"); fflush(stdout);
    read(0, &b, 1);
    return 0;
}
""", str(tmp_path / "dropper"))
    child = subprocess.Popen([dropper, data], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    registry.remember(child.pid)
    frozen = None
    try:
        base = int(child.stdout.readline(), 16)
        frozen = dump.freeze(child.pid)
        section, _ = memory.dump(child.pid, frozen.status)
        frozen.tracker = precopy.WriteTracker(frozen, section)
        frozen.tracker.start()
        frozen.run()
        child.stdin.write("d")
        child.stdin.flush()
        assert child.stdout.readline() == "dropped\n"
        frozen.stop()
        assert memory.intersect(frozen.tracker.written(), [[base, 4 * 4096]]) == [[base + 4096, 4096]]
    finally:
        if frozen is not None:
            frozen.thaw()
        child.kill()
        child.wait()


def test_a_signal_between_the_freezes_is_handled_at_once(tmp_path, registry):
    """Between the first and the final freeze of a live or lazy move the process runs on, and
    handles a signal sent to it then: a traced process would wait in its signal-delivery-stop
    until umig next looked, as long as copying its memory takes."""
    waiter = compile_c(r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static void handle(int sig) { (void)sig; write(1, "signal\n", 7); }
int main(void) {
    signal(SIGUSR1, handle);
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
""", str(tmp_path / "waiter"))
    child = subprocess.Popen([waiter], stdout=subprocess.PIPE, text=True)
    registry.remember(child.pid)
    try:
        assert child.stdout.readline() == "ready\n"
        frozen = dump.freeze(child.pid)
        frozen.run()
        os.kill(child.pid, signal.SIGUSR1)
        ready, _, _ = select.select([child.stdout], [], [], 10)
        assert ready and child.stdout.readline() == "signal\n", "the signal waited for the next freeze"
        frozen.stop()
        frozen.thaw()
        os.kill(child.pid, signal.SIGUSR1)
        assert child.stdout.readline() == "signal\n"
    finally:
        child.kill()
        child.wait()


# A tracer other than umig: seizes the pid it is given, says so, and holds it until killed.
FOREIGN_TRACER = "import ctypes, sys, time; print(ctypes.CDLL(None).ptrace(0x4206, int(sys.argv[1]), 0, 0), flush=True); " \
                 "time.sleep(60)"


def _frozen_then_running(registry, tracked=True, argv=("sleep", "100")):
    """A process frozen once (with a write tracker armed if `tracked`), then running on untraced
    between the freezes."""
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    registry.remember(child.pid)
    wait_until(lambda: proc_state(child.pid) == "S", 10, "it to wait")
    frozen = dump.freeze(child.pid)
    if tracked:
        section, _ = memory.dump(child.pid, frozen.status)
        frozen.tracker = precopy.WriteTracker(frozen, section)
        frozen.tracker.start()
    frozen.run()
    return child, frozen


def test_a_tracer_that_takes_it_between_the_freezes(registry):
    """A debugger that takes the process while it runs between the freezes: the final freeze is
    refused, naming it, and the write tracker's registrations are undone from outside (its
    descriptor stays, registered to nothing): nothing of umig's watches the process."""
    _refused_for_a_foreign_tracer(*_frozen_then_running(registry))


@pytest.mark.parametrize("where", ["between", "over"])
def test_a_tracer_that_takes_it_after_it_mapped_a_shared_file_among_watched_mappings(registry, tmp_path, where):
    """As above, where the process has mapped meanwhile a shared file (which userfaultfd does not
    take) between two mappings the tracker registered together, or over the middle of one: the
    mappings registered then are unregistered one by one."""
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    sharer = compile_c(r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char b, *a = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (argv[2][0] == 'b')
        munmap(a + 4096, 4096);  /* two anonymous mappings with a hole between: one series to umig */
    a[0] = a[2 * 4096] = 1;
    if (read(0, &b, 1) != 1) return 1;
    mmap(a + 4096, 4096, PROT_READ, MAP_SHARED | MAP_FIXED, open(argv[1], O_RDONLY), 0);
    printf("mapped\n"); fflush(stdout);
    for (;;) pause();
}
""", str(tmp_path / "sharer"))
    child, frozen = _frozen_then_running(registry, argv=(sharer, data, where))
    child.stdin.write("m")
    child.stdin.flush()
    assert child.stdout.readline() == "mapped\n"
    _refused_for_a_foreign_tracer(child, frozen)


def _refused_for_a_foreign_tracer(child, frozen):
    foreign = subprocess.Popen([sys.executable, "-c", FOREIGN_TRACER, str(child.pid)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert foreign.stdout.readline().strip() == "0"
        with pytest.raises(Refused, match=rf"pid {child.pid} is traced by pid {foreign.pid}"):
            frozen.stop()
        frozen.thaw()
        assert not [start for start, flags in procfs.smaps(child.pid).items() if "uw" in flags]
    finally:
        foreign.kill()
        foreign.wait()
    wait_until(lambda: proc_state(child.pid) == "S" and procfs.status(child.pid)["TracerPid"] == "0", 10,
               "the process to run on untraced")
    child.kill()
    child.wait()


def test_a_pid_taken_by_another_process_between_the_freezes(registry):
    """The process exits between the freezes and its pid goes to another: the final freeze
    refuses, and leaves that other process alone."""
    child, frozen = _frozen_then_running(registry, tracked=False)
    child.kill()
    child.wait()
    stranger = None
    for _ in range(50):  # another process may take the pid first: try again
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(child.pid - 1))
        stranger = subprocess.Popen(["sleep", "100"])
        registry.remember(stranger.pid)
        if stranger.pid == child.pid:
            break
        stranger.kill()
        stranger.wait()
    assert stranger.pid == child.pid, "could not give the pid to another process"
    try:
        with pytest.raises(Refused, match=rf"pid {child.pid} exited while umig copied it"):
            frozen.stop()
        frozen.thaw()
        assert procfs.status(stranger.pid)["TracerPid"] == "0" and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_stopped_by_job_control_between_the_freezes(registry):
    """A process stopped (SIGSTOP) between the freezes is refused, as before a first freeze, and
    stays stopped, untraced, until continued."""
    child, frozen = _frozen_then_running(registry, tracked=False)
    os.kill(child.pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(child.pid) == "T", 10, "the process to stop")
    with pytest.raises(Refused, match=r"is stopped \(job control\)"):
        frozen.stop()
    # Detached, it passes through the signal path once more on its way back to its stop.
    wait_until(lambda: proc_state(child.pid) == "T" and procfs.status(child.pid)["TracerPid"] == "0", 10,
               "the process to stay stopped, untraced")
    os.kill(child.pid, signal.SIGCONT)
    wait_until(lambda: proc_state(child.pid) == "S", 10, "the process to go on")


def test_thawed_after_it_executed_another_program_between_the_freezes(registry):
    """The write tracker's userfaultfd is gone from a process that executed another program
    (close-on-exec; here the shell puts a file over that very number first): the thaw closes
    nothing in the new program, whose file stays open."""
    child, frozen = _frozen_then_running(
        registry, argv=("bash", "-c", "ulimit -n 1024; read line; exec sleep 100 1023</dev/null"))
    assert frozen.tracker.fd == 1023
    child.stdin.write("go\n")
    child.stdin.flush()
    wait_until(lambda: procfs.read_text(child.pid, "cmdline").startswith("sleep\0"), 10, "the exec")
    frozen.stop()
    frozen.thaw()
    assert os.path.exists(f"/proc/{child.pid}/fd/1023"), "the thaw closed the new program's file"
    wait_until(lambda: proc_state(child.pid) == "S" and procfs.status(child.pid)["TracerPid"] == "0", 10,
               "the process to run on untraced")
    child.kill()
    child.wait()


EXECER_MIB = "128"


@pytest.mark.parametrize("mode", ["live", "lazy"])
def test_it_executes_another_program_between_the_freezes(agent, registry, c_make, mode):
    """The process executes a program (itself again) while it runs between the freezes: the
    write tracker went with the old memory, so the new program's goes whole in the final freeze,
    and it goes on there as a run never moved does."""
    make = c_make("execer", "between", EXECER_MIB)
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    since = agent.mark()
    outcome = []
    mover = threading.Thread(target=lambda: outcome.append(migrate(wl.pid, agent.target(), f"--{mode}")))
    mover.start()
    executed = False
    while mover.is_alive() and not executed:
        with contextlib.suppress(OSError):
            executed = procfs.read_text(wl.pid, "cmdline").endswith("\0second\0")
        time.sleep(0.001)
    mover.join()
    assert outcome, "the migration failed (its error is above)"
    info = outcome[0]
    registry.remember(info["target_pid"])
    assert executed, "the source did not execute the second program while it was moved"
    wl.wait_exit(30)
    wl.fire()
    assert agent.wait_exit(info["target_pid"], 60, since) == ("status", 0)
    assert_same_output(wl, ref)


@pytest.mark.parametrize("mode", ["live", "lazy"])
def test_it_ends_between_the_freezes(agent, registry, c_make, mode):
    """The process ends while it runs between the freezes: the move is refused, saying so, and
    nothing is left on the target; it ended as a run never moved does."""
    make = c_make("execer", "ends-between", EXECER_MIB)
    ref = reference_run(make("ref"))
    wl = make("mig").start().wait_ready()
    since = time.time()
    line = migrate_expecting_failure(wl.pid, agent.target(), f"--{mode}")
    assert f"pid {wl.pid} exited while umig copied it" in line, line
    assert wl.wait_exit(30) == 0
    assert_same_output(wl, ref)
    assert_target_clean(agent, since, registry, markers=[wl.argv[0]])
