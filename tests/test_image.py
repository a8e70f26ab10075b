"""Images on disk: `umig show` tells the truth about the process dumped, `dump --leave-running`
leaves it undisturbed, `dump` + `restore` round trips keep every kind of state, and a restore
refuses files that changed since the dump."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import (assert_clean_failure, assert_maps_equal, assert_no_leftovers, assert_same_output, c_workload,
                      nspid, parse_maps, proc_state, read_maps, reference_run, run_umig, wait_gone, wait_until,
                      write_input_text)
from umig import dump as umig_dump, image as umig_image
from umig.demo import compile_c


def hex_in(value, text):
    """`value` appears in text as a hex number (any case, with or without 0x and leading zeros)."""
    return re.search(rf"(?<![0-9a-f])(0x)?0*{value:x}(?![0-9a-f])", text, re.I) is not None


def size_in(nbytes, text):
    """A size shown as bytes, hex, KiB/kB or MiB (with optional decimals)."""
    kib, mib = nbytes / 1024, nbytes / (1 << 20)
    forms = [rf"\b{nbytes}\b", rf"\b0x0*{nbytes:x}\b", rf"\b{kib:g}(\.0+)?\s*(KiB|kB|K)\b",
             rf"\b{mib:g}(\.0+)?\s*(MiB|MB|M)\b"]
    return any(re.search(f, text, re.I) for f in forms)


def dump(pid, path, *extra):
    r = run_umig("dump", pid, "-o", path, *extra)
    assert r.returncode == 0, f"umig dump {pid} failed: {r.stderr.strip()}"
    assert path.stat().st_size > 0
    return r


def restore(path):
    r = run_umig("restore", path, "--json")
    assert r.returncode == 0, f"umig restore {path} failed: {r.stderr.strip()}"
    info = json.loads(r.stdout)
    for key in ("source_pid", "target", "target_pid", "pages", "bytes", "total_s", "frozen_s"):
        assert key in info, f"umig restore --json lacks {key!r}: {info}"
    return info


def test_show_describes_the_process(workloads, registry, tmp_path):
    """dump --leave-running, then `umig show`: mappings with their sizes, registers, fds and
    signal state match what the process is known to hold; the process itself goes on
    undisturbed (its output equals a run that was never dumped)."""
    def make(label):
        wl = c_workload(workloads, "inspect", tmp_path / label, registry=registry)
        wl.dir.joinpath("data.txt").write_text("x" * 123 + "HELLO world\n")
        return wl
    ref = reference_run(make("ref"))
    wl = make("src").start().wait_ready()
    maps_text = read_maps(wl.pid)
    maps = parse_maps(maps_text)
    facts = dict(line.split(" ", 1) for line in wl.stderr().splitlines())
    handler = int(facts["handler"], 16)
    region, region_size = (int(x, 0) for x in facts["region"].split())
    img = tmp_path / "inspect.img"
    dump(wl.pid, img, "--leave-running")

    r = run_umig("show", img)
    assert r.returncode == 0, f"umig show failed: {r.stderr.strip()}"
    show = r.stdout
    # every mapping, by address, with its size; one of them holds the 3 MiB region
    lines = show.splitlines()
    for start, end, perms, _, path in maps:
        start, end = int(start, 16), int(end, 16)
        shown = [ln for ln in lines if hex_in(start, ln) and (not path or path in ln)]
        assert shown, f"umig show does not list the mapping {start:x}-{end:x} {perms} {path}:\n{show}"
        assert any(size_in(end - start, ln) or hex_in(end, ln) for ln in shown), (
            f"the size of {start:x}-{end:x} ({end - start} bytes) is not shown: {shown}")
    assert any(int(s, 16) <= region and region + region_size <= int(e, 16) and "rw" in p for s, e, p, _, _ in maps)
    # registers: r12-r15 held known values during the wait
    for name, value in (("r12", 0x1111222233334444), ("r13", 0x5555666677778888), ("r14", 0x99990000aaaabbbb),
                        ("r15", 0xccccddddeeeeffff)):
        assert hex_in(value, show), f"{name} = {value:#x} is not in umig show's output"
    # fds: the data file at fd 5 (offset 123) and /dev/null at fd 7
    data_path = str(wl.dir / "data.txt")
    fd5 = [ln for ln in show.splitlines() if data_path in ln]
    assert fd5 and re.search(r"\b5\b", fd5[0]), f"fd 5 -> {data_path} is not shown:\n{show}"
    assert re.search(r"\b123\b", fd5[0]), f"fd 5's offset 123 is not shown: {fd5[0]}"
    assert any("/dev/null" in ln and re.search(r"\b7\b", ln) for ln in show.splitlines()), "fd 7 -> /dev/null"
    # signals: the SIGUSR2 handler's address; SIGUSR1 blocked and pending
    assert hex_in(handler, show), f"the SIGUSR2 handler {handler:#x} is not shown:\n{show}"
    assert re.search(r"SIGUSR2|\b12\b", "\n".join(ln for ln in show.splitlines() if hex_in(handler, ln)))
    pending = [ln for ln in show.splitlines() if "pending" in ln.lower()]
    assert pending and any(re.search(r"SIGUSR1|\b10\b", ln) for ln in pending), f"pending SIGUSR1 not shown: {pending}"

    # --leave-running: the process continues exactly as if nothing had happened
    assert wl.proc.poll() is None, "dump --leave-running ended the process"
    assert_maps_equal(maps_text, read_maps(wl.pid), "after dump --leave-running")
    wl.fire()
    assert wl.wait_exit(60) == 0
    assert_same_output(wl, ref, stderr=False)  # stderr holds this run's addresses


ROUND_TRIPS = {
    "signals": dict(files=()),
    "registers": dict(files=()),
    "files": dict(files=("out.dat", "log.txt", "new.dat"), prepare=lambda d: write_input_text(d / "input.txt")),
    "rseq": dict(files=()),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(workloads, registry, tmp_path, name):
    """dump (which ends the source) then restore from the file: the process continues as if it
    had never stopped, with its PID and its memory layout."""
    spec = ROUND_TRIPS[name]

    def make(label):
        wl = c_workload(workloads, name, tmp_path / label, registry=registry)
        if spec.get("prepare"):
            spec["prepare"](wl.dir)
        return wl
    ref = reference_run(make("ref"))
    wl = make("src").start().wait_ready()
    maps = read_maps(wl.pid)
    img = tmp_path / f"{name}.img"
    dump(wl.pid, img)
    wl.wait_exit(30)  # the dump ends the source
    info = restore(img)
    tpid = info["target_pid"]
    registry.remember(tpid)
    assert info["source_pid"] == wl.pid
    assert_maps_equal(maps, read_maps(tpid))
    assert nspid(tpid)[-1] == wl.pid
    wl.fire()
    wait_gone(tpid, 60, "restored process")
    assert_same_output(wl, ref, spec["files"])


def test_restore_refuses_changed_executable(workloads, registry, tmp_path):
    """The executable was replaced between dump and restore: refused, naming it. With the
    original put back (same inode, same times) the very same image restores."""
    exe_dir = tmp_path / "exe"
    exe_dir.mkdir()
    exe = exe_dir / "memory"
    shutil.copy2(workloads("memory"), exe)
    wl = c_workload(workloads, "memory", tmp_path / "src", "4", registry=registry)
    wl.argv[0] = str(exe)
    ref = c_workload(workloads, "memory", tmp_path / "ref", "4", registry=registry)
    ref.argv[0] = str(exe)
    reference_run(ref)
    wl.start().wait_ready()
    img = tmp_path / "memory.img"
    dump(wl.pid, img)
    wl.wait_exit(30)

    os.rename(exe, exe_dir / "memory.orig")
    shutil.copy2(workloads("memory", "VARIANT=1"), exe)
    since = time.time()
    line = assert_clean_failure(run_umig("restore", img), what="umig restore with another executable")
    assert str(exe) in line, f"the refusal should name {exe}: {line}"
    assert_no_leftovers(since, markers=[str(exe)], pids=[wl.pid])

    os.replace(exe_dir / "memory.orig", exe)
    info = restore(img)
    registry.remember(info["target_pid"])
    wl.fire()
    wait_gone(info["target_pid"], 60, "restored process")
    assert_same_output(wl, ref)


def test_restore_refuses_changed_mapped_file(workloads, registry, tmp_path):
    """A file the process maps (ro.dat, read-only, not in the image: its pages are the file's)
    changed between dump and restore: refused, naming it. Put back byte for byte with its times,
    the image restores and the process reads the right bytes."""
    ref = reference_run(c_workload(workloads, "memory", tmp_path / "ref", "4", registry=registry))
    wl = c_workload(workloads, "memory", tmp_path / "src", "4", registry=registry).start().wait_ready()
    img = tmp_path / "memory.img"
    dump(wl.pid, img)
    wl.wait_exit(30)

    ro = wl.dir / "ro.dat"
    original, st = ro.read_bytes(), ro.stat()
    changed = bytearray(original)
    changed[5000] ^= 0xff
    ro.write_bytes(bytes(changed))
    since = time.time()
    line = assert_clean_failure(run_umig("restore", img), what="umig restore with a changed mapped file")
    assert str(ro) in line, f"the refusal should name {ro}: {line}"
    assert_no_leftovers(since, markers=[str(wl.argv[0])], pids=[wl.pid])

    ro.write_bytes(original)
    os.utime(ro, ns=(st.st_atime_ns, st.st_mtime_ns))
    info = restore(img)
    registry.remember(info["target_pid"])
    wl.fire()
    wait_gone(info["target_pid"], 60, "restored process")
    assert_same_output(wl, ref)


def test_a_signal_pending_in_the_image_interrupts_as_it_would_have(registry, tmp_path):
    """A signal that came while the process was frozen in pause() travels in the image, pending:
    where it is restored its handler runs and pause() returns EINTR, as without umig (a
    restarted pause() would wait for ever)."""
    pauser = compile_c(r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void handle(int sig) { (void)sig; write(1, "handled\n", 8); }
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handle;
    sigaction(SIGUSR1, &sa, NULL);
    printf("ready\n"); fflush(stdout);
    int r = pause();
    printf("pause returned %d errno=%d\n", r, errno);
    return 0;
}
""", str(tmp_path / "pauser"))
    out, img = tmp_path / "out.txt", tmp_path / "pauser.img"
    with open(out, "w") as f:
        child = subprocess.Popen([pauser], stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    registry.remember(child.pid)
    wait_until(lambda: out.read_text() == "ready\n" and proc_state(child.pid) == "S", 10, "the pauser to pause")
    frozen = umig_dump.freeze(child.pid)
    os.kill(child.pid, signal.SIGUSR1)  # held pending while it is frozen
    sink = umig_image.FileSink(img)
    state, runs = umig_dump.collect(frozen)
    umig_dump.write_image(umig_image.ImageWriter(sink), frozen, state, runs)
    sink.commit()
    frozen.release()
    child.wait()
    registry.remember(restore(img)["target_pid"])
    wait_until(lambda: "pause returned" in out.read_text(), 10, "pause() to return")
    assert out.read_text() == f"ready\nhandled\npause returned -1 errno={errno.EINTR}\n"
