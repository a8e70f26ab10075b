#!/usr/bin/env python3
"""The benchmark harness: how fast does umig move a process, and how long is it frozen?

Run with ``make bench`` (as root), or ``.venv/bin/python benchmarks/bench.py [--quick]
[--sizes 16 256 1024] [--modes stop live lazy] [--workloads idle writer python sparse]``.

Workloads (workload.c, compiled at run time, and workload.py for CPython): an idle heap
of each size, a heap rewritten at random pages at a steady rate, an unmodified CPython
interpreter holding about 10 MiB of objects, and a 64 GiB MAP_NORESERVE mapping with
10 MiB touched. Each one runs a CLOCK_MONOTONIC loop and reports the longest gap between
two iterations: the frozen time as the process itself saw it. After each move the
migrated process checks every page it owns; a row whose check fails is a failed row.

Modes: stop-and-copy (``umig migrate``), and ``--live`` / ``--lazy`` where ``umig migrate
--help`` offers them. With a working CRIU (``criu check`` passes) the same workloads also
go through ``criu dump`` + ``criu restore`` with images in tmpfs, and, next to ``--lazy``,
through CRIU's lazy-pages over its page server (which needs fs.pipe-max-size >= 4 MiB:
``--raise-pipe-max-size`` raises it for the run).

Every row gets a fresh agent on a free loopback port, so its CPU time and peak RSS
belong to that row alone. Results: a table with targets, benchmarks/results/NAME.json,
and NAME-frozen.png / NAME-total.png when matplotlib is installed.
"""

import argparse
import ctypes
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from umig.demo import (  # noqa: E402  (after the path fix-up)
    Agent, Cleanup, DemoError, alive, compile_c, free_port, ns_pids, parse_json_output,
    preflight, say, umig_command, wait_dead,
)

RESULTS_DIR = os.path.join(HERE, "results")
MIB = 2**20

UMIG_MODES = {"stop": [], "live": ["--live"], "lazy": ["--lazy"]}
MODE_LABELS = {"stop": "stop-and-copy", "live": "--live", "lazy": "--lazy",
               "dump": "dump+restore", "lazy-pages": "lazy-pages"}
# Per umig mode, the CRIU mode that does the same job; used for the ratio lines.
CRIU_COUNTERPART = {"stop": "dump", "lazy": "lazy-pages"}

DEFAULT_SIZES = [16, 256, 1024, 4096]
QUICK_SIZES = [16]
SPARSE_VIRT_MIB = 64 * 1024
SPARSE_TOUCH_MIB = 10
# CRIU's lazy-pages moves pages through pipes this large (see docs/performance.md).
CRIU_LAZY_PIPE_MIN = 4 * MIB
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PIDNS_INIT = os.path.join(HERE, "pidns_init.py")


# --------------------------------------------------------------------------- workloads

class Workload:
    """One process to migrate. `size_mib` is the memory it holds (for the plots)."""

    def __init__(self, kind, size_mib, label, extra=()):
        self.kind, self.size_mib, self.label, self.extra = kind, size_mib, label, list(extra)

    def command(self, binaries, rundir):
        if self.kind == "python":
            return [binaries["python"], binaries["python_script"], rundir, str(self.size_mib)]
        return [binaries["c"], rundir, self.kind, *map(str, self.extra)]

    def fill_timeout(self):
        return 60 + self.size_mib / 50


def make_workloads(args):
    chosen = []
    for kind in args.workloads:
        if kind == "idle":
            chosen += [Workload("idle", s, f"idle {s} MiB", [s]) for s in args.sizes]
        elif kind == "writer":
            chosen.append(Workload("writer", args.writer_mib,
                                   f"writer {args.writer_mib} MiB @ {args.writer_rate:g} MiB/s",
                                   [args.writer_mib, args.writer_rate]))
        elif kind == "python":
            chosen.append(Workload("python", args.python_mib, f"CPython {args.python_mib} MiB"))
        elif kind == "sparse":
            chosen.append(Workload("sparse", SPARSE_TOUCH_MIB,
                                   f"sparse {SPARSE_VIRT_MIB // 1024} GiB, {SPARSE_TOUCH_MIB} MiB used",
                                   [SPARSE_VIRT_MIB, SPARSE_TOUCH_MIB]))
            # Its target compares it with the same pages in a dense heap.
            if not any(w.kind == "idle" and w.size_mib == SPARSE_TOUCH_MIB for w in chosen):
                chosen.append(Workload("idle", SPARSE_TOUCH_MIB, f"idle {SPARSE_TOUCH_MIB} MiB",
                                       [SPARSE_TOUCH_MIB]))
    return chosen


def parse_report(text):
    """'ok key=value ...' -> {'verdict': 'ok', key: int or str}."""
    words = text.split()
    fields = {"verdict": words[0] if words else ""}
    for w in words[1:]:
        key, _, value = w.partition("=")
        try:
            fields[key] = int(value)
        except ValueError:
            fields[key] = value
    return fields


def wait_for_file(path, timeout, pid=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            pass
        if pid is not None and not alive(pid):
            raise DemoError(f"PID {pid} died while we waited for {os.path.basename(path)}")
        time.sleep(0.02)
    raise DemoError(f"no {os.path.basename(path)} from PID {pid} after {timeout:.0f} s")


def report(pid, rundir, timeout):
    """Have PID check its memory and report its longest gap; raise unless it is ok."""
    path = os.path.join(rundir, "result")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    text = wait_for_file(path, timeout, pid)
    fields = parse_report(text)
    if fields["verdict"] != "ok":
        raise DemoError(f"memory check in PID {pid} failed: {text}")
    fields["text"] = text
    return fields


# --------------------------------------------------------------------------- measuring

class Measured:
    """A command running in a session of its own, reaped with wait4 so that its CPU time
    and peak RSS (the kernel's hiwater RSS, what VmHWM showed while it ran) are known,
    children it waited for included. `stop_signals` end it when it must stop early."""

    def __init__(self, cmd, pass_fds=(), stop_signals=(signal.SIGINT, signal.SIGKILL)):
        self.cmd, self.stop_signals = cmd, stop_signals
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.started = time.monotonic()
        # A session of its own: a Ctrl-C reaches it once, from us, in stop().
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=self.err, start_new_session=True, pass_fds=pass_fds)
        self.done = {}
        self.waiter = threading.Thread(target=self._reap, daemon=True)
        self.waiter.start()

    def _reap(self):
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.done.update(status=status, usage=usage, ended=time.monotonic())

    def running(self):
        return self.waiter.is_alive()

    def finish(self, timeout):
        """Wait for the end. Returns (exit code, stdout, stderr, wall s, CPU s, peak RSS
        bytes); stops the command if it does not end in time, or on any error."""
        try:
            self.waiter.join(timeout)
            if self.waiter.is_alive():
                raise DemoError(f"`{' '.join(map(str, self.cmd[:4]))} ...` did not finish "
                                f"in {timeout:.0f} s")
        except BaseException:
            self.stop()
            raise
        status, usage = self.done["status"], self.done["usage"]
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        outputs = []
        for f in (self.out, self.err):
            f.seek(0)
            outputs.append(f.read().decode(errors="replace"))
            f.close()
        return (self.proc.returncode, *outputs, self.done["ended"] - self.started,
                usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)

    def stop(self):
        # SIGINT first by default: an interrupted migration must leave its source running.
        for sig in self.stop_signals:
            if not self.waiter.is_alive():
                break
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.waiter.join(10)


def run_measured(cmd, timeout):
    """Run cmd to completion: Measured.finish's figures."""
    return Measured(cmd).finish(timeout)


def cpu_seconds(pid):
    """CPU time of PID and of the children it has waited for."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def machine_info():
    info = {"kernel": platform.release(), "arch": platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def become_subreaper():
    """A process `criu restore -d` leaves behind becomes our child, so we reap it at once
    instead of waiting for PID 1 (slow to reap here) to free its PID."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_processes(proc, *others):
    """SIGKILL what is still alive of proc (our child) and others, then reap proc."""
    for pid in (proc.pid if proc else None, *others):
        if pid is not None and alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def reap_orphans():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_marked(marker):
    """SIGKILL our workloads, wherever they ended up: every process whose command line
    names our private temporary directory, which nothing else on the host does."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] == os.getpid():
            continue
        if any(marker in arg for arg in (p.info["cmdline"] or [])):
            try:
                os.kill(p.info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- tools

def umig_modes():
    """Which modes `umig migrate` offers: {mode: None if offered, else why not}."""
    res = subprocess.run(umig_command("migrate", "--help"), capture_output=True, text=True)
    offered = {}
    for mode, flags in UMIG_MODES.items():
        missing = [f for f in flags if f not in res.stdout]
        offered[mode] = None if not missing else \
            f"`umig migrate --help` does not offer {' '.join(missing)} (yet)"
    return offered


def criu_status(criu):
    """(path or None, why not)."""
    path = shutil.which(criu)
    if path is None:
        return None, f"no `{criu}` on PATH"
    try:
        res = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`{path} check` did not run: {e}"
    if res.returncode != 0:
        last = (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[-1]
        return None, f"`{path} check` fails here: {last}"
    return path, None


def read_pipe_max_size():
    with open(PIPE_MAX_SIZE) as f:
        return int(f.read())


def write_pipe_max_size(value):
    with open(PIPE_MAX_SIZE, "w") as f:
        f.write(str(value))


def prepare_criu_lazy(args, cleanup):
    """Why the CRIU lazy-pages rows cannot run, or None. CRIU's page server moves the
    pages through pipes of CRIU_LAZY_PIPE_MIN bytes, more than fs.pipe-max-size allows on
    some hosts; with --raise-pipe-max-size the sysctl is raised for the run and `cleanup`
    puts the old value back, whatever way the run ends."""
    try:
        size = read_pipe_max_size()
    except OSError as e:
        return f"fs.pipe-max-size unreadable: {e}"
    if size >= CRIU_LAZY_PIPE_MIN:
        return None
    need = f"CRIU lazy-pages needs fs.pipe-max-size >= {CRIU_LAZY_PIPE_MIN // MIB} MiB " \
           f"(here {size // 1024} KiB)"
    if not args.raise_pipe_max_size:
        return f"{need}; --raise-pipe-max-size raises it for the run"
    try:
        write_pipe_max_size(CRIU_LAZY_PIPE_MIN)
    except OSError as e:
        return f"{need}, and raising it failed: {e}"
    cleanup.add(f"put fs.pipe-max-size back to {size}", restore_pipe_max_size, size)
    say(f"fs.pipe-max-size raised from {size} to {CRIU_LAZY_PIPE_MIN} for the CRIU lazy-pages "
        "rows (--raise-pipe-max-size); it is put back when the run ends")
    return None


def restore_pipe_max_size(size):
    write_pipe_max_size(size)
    say(f"fs.pipe-max-size put back to {read_pipe_max_size()}")


# --------------------------------------------------------------------------- one row

class Row(dict):
    def fail(self, error):
        self.update(ok=False, error=str(error))
        return self


def start_workload(workload, binaries, rundir):
    proc = subprocess.Popen(workload.command(binaries, rundir), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ready = wait_for_file(os.path.join(rundir, "ready"), workload.fill_timeout(), proc.pid)
    # Checks that the check works before anything moves, and starts the gap afresh.
    baseline = report(proc.pid, rundir, workload.fill_timeout())
    return proc, parse_report(ready), baseline


def clock_offset(pid):
    """The CLOCK_MONOTONIC offset of PID's time namespace in seconds (0 in the host's).
    CRIU restores into a time namespace whose clock goes on from the value its dump read,
    so that the process's clock skips the time from that reading to the restore."""
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            for line in f:
                name, sec, nsec = line.split()
                if name == "monotonic":
                    return int(sec) + int(nsec) / 1e9
    except OSError:
        pass
    return 0.0


def frozen_figures(row, after, window, offset=0.0, clock_read_by=None):
    """The process's own view: its longest gap since the check before the move. With a
    clock `offset` (see clock_offset) the gap's end is moved back onto the host's clock,
    and a gap that began before the dump read the clock (which it did by `clock_read_by`)
    spans the move: it gets the skipped time back. A longest gap that began later hides the
    shortened one that spanned the move, which lasted at least the skipped time: that
    lower bound is the figure then (`frozen_at_least`)."""
    gap_s = after["max_gap_ns"] / 1e9
    gap_end = after["gap_end_ns"] / 1e9
    spans = gap_end - gap_s < clock_read_by if offset else True
    if offset and spans:
        gap_s -= offset
    gap_end -= offset
    row["frozen_at_least"] = not spans and -offset > gap_s
    row["frozen_s"] = max(gap_s, -offset)
    row["clock_offset_s"] = offset
    # Did that gap fall inside the move (monotonic clocks are shared on one host)?
    row["gap_in_window"] = gap_end >= window[0] and gap_end - gap_s <= window[1] + 0.05
    row["iterations"] = after.get("iterations")
    row["verdict"] = after["text"]


def bench_umig(workload, mode, binaries, workdir, run):
    row = Row(workload=workload.kind, label=workload.label, size_mib=workload.size_mib,
              tool="umig", mode=mode, run=run)
    rundir = tempfile.mkdtemp(prefix=f"{workload.kind}-", dir=workdir)
    agent = Agent(f"bench-{mode}", rundir)
    proc = target_pid = None
    try:
        proc, _, baseline = start_workload(workload, binaries, rundir)
        row["source_pid"] = proc.pid
        row["baseline_gap_s"] = baseline["max_gap_ns"] / 1e9
        agent.start()
        agent_cpu0 = cpu_seconds(agent.proc.pid)
        window = [time.monotonic()]
        rc, out, err, wall, cli_cpu, cli_rss = run_measured(
            umig_command("migrate", proc.pid, agent.address, "--json", *UMIG_MODES[mode]),
            timeout=120 + workload.size_mib / 10)
        window.append(time.monotonic())
        if rc != 0:
            raise DemoError(f"umig migrate failed (exit {rc}): {(err.strip() or out.strip())[-500:]}")
        result = parse_json_output(out)
        target_pid = int(result["target_pid"])
        row["target_pid"] = target_pid
        if not wait_dead(proc.pid, 10, proc):
            raise DemoError(f"the source PID {proc.pid} still runs after the migration")
        after = report(target_pid, rundir, workload.fill_timeout())
        # After the check: a lazy migration's agent may serve pages until then.
        agent_cpu = cpu_seconds(agent.proc.pid) - agent_cpu0
        agent_rss = peak_rss(agent.proc.pid)
        frozen_figures(row, after, window)
        total = float(result["total_s"])
        row.update(
            ok=True, total_s=total, tool_frozen_s=float(result["frozen_s"]),
            cli_wall_s=round(wall, 6), pages=int(result["pages"]), bytes=int(result["bytes"]),
            bytes_source="umig --json bytes (page payload)",
            gb_per_s=int(result["bytes"]) / total / 1e9 if total > 0 else None,
            cpu_s=agent_cpu + cli_cpu, agent_cpu_s=agent_cpu, client_cpu_s=cli_cpu,
            agent_peak_rss=agent_rss, client_peak_rss=cli_rss, phases=result["phases"],
            postcopy_faults=result.get("postcopy_faults"))
        return row
    except DemoError as e:
        return row.fail(f"{e}\n{agent.log_tail(8)}")
    finally:
        end_processes(proc, target_pid)
        agent.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def criu_cmd(criu, verb, images, *args):
    return [criu, verb, "-D", images, "-o", f"{verb}.log", "-v2", *map(str, args)]


def criu_log(images, verb):
    try:
        with open(os.path.join(images, f"{verb}.log"), errors="replace") as f:
            return "\n".join(f.read().splitlines()[-6:])
    except OSError:
        return "(no log)"


def image_bytes(images):
    return sum(os.path.getsize(os.path.join(images, n)) for n in os.listdir(images)
               if n.startswith("pages-") and n.endswith(".img"))


def pagemap_lazy_pages(images):
    """How many pages CRIU's pagemap images mark lazy: those its page server hands out.
    An image is 8 bytes of magic, then records of a 32-bit length and a protobuf message:
    a head, then one entry per run of pages (2: page count, 5: a wider page count,
    4: flags)."""
    pe_lazy = 1 << 1
    total = 0
    for name in os.listdir(images):
        if not (name.startswith("pagemap-") and name.endswith(".img")):
            continue
        with open(os.path.join(images, name), "rb") as f:
            data = f.read()
        pos = 8
        first = True
        while pos + 4 <= len(data):
            size = int.from_bytes(data[pos:pos + 4], "little")
            fields = protobuf_varints(data[pos + 4:pos + 4 + size])
            pos += 4 + size
            if not first and fields.get(4, 0) & pe_lazy:
                total += fields.get(5, fields.get(2, 0))
            first = False
    return total


def protobuf_varints(message):
    """{field number: value} of a protobuf message's varint fields (all that a pagemap
    entry has)."""
    fields, pos = {}, 0
    while pos < len(message):
        key, pos = varint(message, pos)
        if key & 7 != 0:
            raise DemoError(f"unexpected protobuf wire type {key & 7} in a CRIU pagemap")
        fields[key >> 3], pos = varint(message, pos)
    return fields


def varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def start_until_ready(cmd, timeout, started):
    """Start a CRIU command that reports readiness on --status-fd (a dump that serves lazy
    pages, the lazy-pages daemon) and wait for it: returns its Measured."""
    read_end, write_end = os.pipe()
    try:
        m = Measured([*cmd, "--status-fd", str(write_end)], pass_fds=(write_end,))
        started.append(m)
        os.close(write_end)
        write_end = None
        ready, _, _ = select.select([read_end], [], [], timeout)
        # A command that fails closes the pipe without a word.
        if not ready or os.read(read_end, 1) != b"\0":
            raise DemoError(f"criu {cmd[1]} was not ready after {timeout:.0f} s" if not ready
                            else f"criu {cmd[1]} ended before it was ready")
        return m
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def criu_dump_restore(criu, proc, images, timeout, started):
    """criu dump, then criu restore -d once the dumped source has freed its PID."""
    dump = Measured(criu_cmd(criu, "dump", images, "-t", proc.pid))
    started.append(dump)
    rc, _, _, dump_wall, dump_cpu, dump_rss = dump.finish(timeout)
    if rc != 0:
        raise DemoError(f"criu dump failed (exit {rc}): {criu_log(images, 'dump')}")
    proc.wait(timeout=10)
    rc, _, _, restore_wall, restore_cpu, restore_rss = run_measured(
        criu_cmd(criu, "restore", images, "-d"), timeout)
    if rc != 0:
        raise DemoError(f"criu restore failed (exit {rc}): {criu_log(images, 'restore')}")
    return dict(target_pid=proc.pid, clock_read_by=dump.done["ended"],
                total_s=dump_wall + restore_wall, bytes=image_bytes(images),
                bytes_source="CRIU pages-*.img sizes", cpu_s=dump_cpu + restore_cpu,
                client_peak_rss=max(dump_rss, restore_rss))


def criu_lazy_pages(criu, proc, images, timeout, started):
    """Post-copy, CRIU's way: `criu dump --lazy-pages` writes the images without the
    pages it may leave behind and serves those on a port, keeping the source frozen until
    they are all gone. The target side gets a copy of that images directory, runs
    `criu lazy-pages --page-server`, which fetches the pages from the port (those the
    process faults on first, the rest in the background), and `criu restore --lazy-pages
    -d`. Source and target share one host and the source keeps its PID to the end, so
    the restore runs in a fresh PID namespace (the process keeps its PID inside it, as
    under umig)."""
    port = free_port()
    dump = start_until_ready(
        criu_cmd(criu, "dump", images, "-t", proc.pid, "--lazy-pages",
                 "--address", "127.0.0.1", "--port", port), timeout, started)
    clock_read_by = time.monotonic()
    target = images + "-target"
    shutil.copytree(images, target, ignore=shutil.ignore_patterns("*.log"))
    try:
        lazy = start_until_ready(
            criu_cmd(criu, "lazy-pages", target, "--page-server",
                     "--address", "127.0.0.1", "--port", port), timeout, started)
        status = os.path.join(target, "restore.status")
        # unshare ignores SIGINT while it waits; its SIGKILL takes the namespace along.
        restore = Measured(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                            sys.executable, PIDNS_INIT, status,
                            *criu_cmd(criu, "restore", target, "--lazy-pages", "-d")],
                           stop_signals=(signal.SIGKILL,))
        started.append(restore)
        rc, restore_cpu, restore_rss = map(float, wait_for_file(
            status, timeout, restore.proc.pid).split())
        if rc != 0:
            raise DemoError(f"criu restore failed (exit {rc:.0f}): {criu_log(target, 'restore')}")
        # The namespace's init and the process both have the source's PID in there.
        restored = [p.pid for p in psutil.Process(restore.proc.pid).children(recursive=True)
                    if ns_pids(p.pid)[-1:] == [proc.pid]]
        if not restored:
            raise DemoError("criu restore succeeded, but its process is gone")
        figures = dict(target_pid=restored[-1], clock_read_by=clock_read_by)
        cpu, rss = restore_cpu, restore_rss
        for verb, m, where in (("lazy-pages", lazy, target), ("dump", dump, images)):
            rc, _, _, _, c, r = m.finish(timeout)
            if rc != 0:
                raise DemoError(f"criu {verb} failed (exit {rc}): {criu_log(where, verb)}")
            cpu, rss = cpu + c, max(rss, r)
        figures.update(
            total_s=max(lazy.done["ended"], dump.done["ended"]) - dump.started,
            bytes=image_bytes(images) + pagemap_lazy_pages(images) * PAGE_SIZE,
            bytes_source="CRIU pages-*.img sizes + the pages its pagemap marks lazy",
            cpu_s=cpu, client_peak_rss=int(rss))
        return figures
    finally:
        shutil.rmtree(target, ignore_errors=True)


def bench_criu(workload, mode, binaries, workdir, run, criu):
    row = Row(workload=workload.kind, label=workload.label, size_mib=workload.size_mib,
              tool="criu", mode=mode, run=run)
    rundir = tempfile.mkdtemp(prefix=f"{workload.kind}-", dir=workdir)
    # tmpfs, so CRIU is not measured against a disk.
    images = tempfile.mkdtemp(prefix="umig-bench-criu-", dir="/dev/shm")
    proc = None
    started = []
    timeout = 120 + workload.size_mib / 10
    move = criu_dump_restore if mode == "dump" else criu_lazy_pages
    try:
        proc, _, baseline = start_workload(workload, binaries, rundir)
        row["source_pid"] = proc.pid
        row["baseline_gap_s"] = baseline["max_gap_ns"] / 1e9
        window = [time.monotonic()]
        figures = move(criu, proc, images, timeout, started)
        window.append(time.monotonic())
        row["target_pid"] = target_pid = figures.pop("target_pid")
        after = report(target_pid, rundir, workload.fill_timeout())
        frozen_figures(row, after, window, clock_offset(target_pid), figures.pop("clock_read_by"))
        row.update(ok=True, tool_frozen_s=None, cli_wall_s=figures["total_s"],
                   client_cpu_s=figures["cpu_s"], agent_cpu_s=0.0, agent_peak_rss=None,
                   **figures)
        row["gb_per_s"] = row["bytes"] / row["total_s"] / 1e9 if row["total_s"] > 0 else None
        return row
    except (DemoError, subprocess.TimeoutExpired, psutil.Error) as e:
        return row.fail(e)
    finally:
        for m in started:
            m.stop()
        end_processes(proc, row.get("target_pid"))
        reap_orphans()
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)


# --------------------------------------------------------------------------- output

def ms(x):
    return "-" if x is None else f"{x * 1e3:.1f}"


def mib(x):
    return "-" if x is None else f"{x / MIB:.1f}"


def summarize(rows):
    """One row per workload, tool and mode: the median of each figure over its runs; a
    failed run makes the whole row failed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["workload"], r["size_mib"], r["tool"], r["mode"]), []).append(r)
    summary = []
    for runs in groups.values():
        bad = [r for r in runs if not r["ok"]]
        if bad:
            summary.append(Row(bad[0], runs=len(runs)))
            continue
        row = Row(runs[0], runs=len(runs), gap_in_window=all(r["gap_in_window"] for r in runs))
        for key, value in runs[0].items():
            if isinstance(value, float) or key in ("bytes", "pages", "agent_peak_rss", "client_peak_rss",
                                                   "postcopy_faults"):
                values = sorted(r[key] for r in runs if r.get(key) is not None)
                row[key] = values[len(values) // 2] if values else None
        if "phases" in row:
            row["phases"] = median_phases([r["phases"] for r in runs])
        summary.append(row)
    return summary


def median_phases(runs):
    """Each side's steps with the median of their milliseconds over runs (runs whose steps
    differ from the first run's are left out)."""
    median = {}
    for side, steps in runs[0].items():
        names = [name for name, _ in steps]
        alike = [r[side] for r in runs if [name for name, _ in r[side]] == names]
        median[side] = [[name, sorted(run[i][1] for run in alike)[len(alike) // 2]] for i, name in enumerate(names)]
    return median


def print_phases(rows):
    """Where umig's time went, step by step on each side (umig migrate --json's phases)."""
    say()
    say("where the time goes (ms per step, umig's own clock; the source's steps run while the target's do):")
    for r in rows:
        if r["ok"] and r.get("phases"):
            say(f"  {r['label']}, {MODE_LABELS[r['mode']]}:")
            for side in ("source", "target"):
                say(f"    {side}: " + ", ".join(f"{name} {value:.1f}" for name, value in r["phases"][side]))
            if r.get("postcopy_faults") is not None:
                say(f"    the process's page faults while pages were still coming: {r['postcopy_faults']}")


def print_table(rows):
    cols = [("workload", 34, "<"), ("tool", 4, "<"), ("mode", 13, "<"), ("total ms", 9, ">"),
            ("frozen ms", 9, ">"), ("(tool)", 8, ">"), ("moved MiB", 9, ">"), ("GB/s", 5, ">"),
            ("CPU s", 6, ">"), ("agent MiB", 9, ">"), ("client MiB", 10, ">"), ("check", 5, "<")]
    say()
    say(" ".join(f"{name:{align}{width}}" for name, width, align in cols))
    skipped = {}
    for r in rows:
        head = [r["label"], r["tool"], MODE_LABELS[r["mode"]]]
        if r.get("skipped"):
            skipped.setdefault((r["tool"], MODE_LABELS[r["mode"]], r["error"]), []).append(r)
            continue
        if not r["ok"]:
            cells = head + ["FAILED: " + [ln for ln in r["error"].splitlines() if ln.strip()][0][:90]]
        else:
            gbps = "-" if r.get("gb_per_s") is None else f"{r['gb_per_s']:.2f}"
            frozen = (">" if r.get("frozen_at_least") else "") + ms(r["frozen_s"]) \
                + ("" if r["gap_in_window"] else "?")
            cells = head + [ms(r["total_s"]), frozen, ms(r.get("tool_frozen_s")), mib(r["bytes"]),
                            gbps, f"{r['cpu_s']:.2f}", mib(r.get("agent_peak_rss")),
                            mib(r.get("client_peak_rss")), "ok"]
        say(" ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols)))
    say()
    say("total: the tool's own total (umig --json total_s; CRIU: dump + restore wall time,")
    say("  lazy-pages: until its last page arrived).")
    say("frozen: the longest gap in the process's own CLOCK_MONOTONIC loop, plus what CRIU's time")
    say("  namespace hid of it ('>': at least; a '?' marks a gap outside the migration's window,")
    say("  i.e. the move froze it less than some other hiccup);")
    say("  (tool): what umig reports as frozen_s. moved: umig's --json bytes (page payload) or")
    say("  the size of CRIU's page images. CPU: agent + client, children included. agent/client")
    say("  MiB: peak RSS (VmHWM). check: the migrated process verified all of its memory.")
    say("Figures are medians when a row ran more than once.")
    for (tool, mode, why), skipped_rows in skipped.items():
        say(f"skipped: {tool} {mode}, {len(skipped_rows)} row(s): {why}")


def find_row(rows, workload, size, tool, mode):
    for r in rows:
        if (r["workload"], r["size_mib"], r["tool"], r["mode"]) == (workload, size, tool, mode) \
                and r.get("ok"):
            return r
    return None


def criu_ratios(rows):
    lines = []
    for r in rows:
        if r["tool"] != "umig" or not r.get("ok") or r["mode"] not in CRIU_COUNTERPART:
            continue
        c = find_row(rows, r["workload"], r["size_mib"], "criu", CRIU_COUNTERPART[r["mode"]])
        if c is None:
            continue
        parts = []
        for key, name in (("total_s", "total"), ("frozen_s", "frozen"), ("bytes", "bytes"),
                          ("cpu_s", "CPU"), ("client_peak_rss", "peak RSS")):
            a = r.get(key) if key != "client_peak_rss" else max(r.get("agent_peak_rss") or 0,
                                                                 r.get("client_peak_rss") or 0)
            b = c.get(key)
            parts.append(f"{name} {a / b:.2f}" if a is not None and b else f"{name} -")
        lines.append(f"{r['label']}, {MODE_LABELS[r['mode']]} / CRIU {MODE_LABELS[c['mode']]}: "
                     + ", ".join(parts))
    return lines


def check_targets(rows):
    """[(target, verdict 'pass'|'FAIL'|'n/a', detail)]."""
    out = []

    def add(name, ok, detail):
        out.append({"target": name, "result": "n/a" if ok is None else ("pass" if ok else "FAIL"),
                    "detail": detail})

    r = find_row(rows, "idle", 1024, "umig", "stop")
    add("stop-and-copy of 1 GiB >= 1.5 GB/s effective",
        None if r is None else r["gb_per_s"] >= 1.5,
        "no successful 1 GiB stop-and-copy row" if r is None else f"{r['gb_per_s']:.2f} GB/s")
    c = find_row(rows, "idle", 1024, "criu", "dump")
    add("stop-and-copy of 1 GiB >= 2x faster than CRIU dump+restore",
        None if r is None or c is None else c["total_s"] / r["total_s"] >= 2,
        "needs both the umig and the CRIU 1 GiB rows" if r is None or c is None
        else f"CRIU {c['total_s']:.2f} s / umig {r['total_s']:.2f} s = {c['total_s'] / r['total_s']:.2f}x")
    writer = [w for w in rows if w["workload"] == "writer"]
    wsize = writer[0]["size_mib"] if writer else 1024
    for mode, limit in (("live", 0.050), ("lazy", 0.020)):
        r = find_row(rows, "writer", wsize, "umig", mode)
        add(f"frozen, 1 GiB under a 1 MiB/s writer, {MODE_LABELS[mode]} <= {limit * 1e3:.0f} ms",
            None if r is None else r["frozen_s"] <= limit,
            f"no successful writer row with {MODE_LABELS[mode]}" if r is None
            else f"{r['frozen_s'] * 1e3:.1f} ms ({r['label']})")
    pyrows = [p for p in rows if p["workload"] == "python"]
    psize = pyrows[0]["size_mib"] if pyrows else 10
    for mode in ("live", "lazy"):
        r = find_row(rows, "python", psize, "umig", mode)
        add(f"frozen, 10 MiB CPython, {MODE_LABELS[mode]} <= 10 ms",
            None if r is None else r["frozen_s"] <= 0.010,
            f"no successful CPython row with {MODE_LABELS[mode]}" if r is None
            else f"{r['frozen_s'] * 1e3:.1f} ms")
    s = find_row(rows, "sparse", SPARSE_TOUCH_MIB, "umig", "stop")
    d = find_row(rows, "idle", SPARSE_TOUCH_MIB, "umig", "stop")
    add(f"64 GiB sparse ({SPARSE_TOUCH_MIB} MiB used) costs about a {SPARSE_TOUCH_MIB} MiB heap "
        "(total time <= 1.5x)",
        None if s is None or d is None else s["total_s"] <= 1.5 * d["total_s"],
        "needs the sparse and the dense stop-and-copy rows" if s is None or d is None
        else f"{s['total_s'] * 1e3:.1f} ms vs {d['total_s'] * 1e3:.1f} ms "
             f"({s['total_s'] / d['total_s']:.2f}x); moved {mib(s['bytes'])} vs {mib(d['bytes'])} MiB")
    return out


def plot(rows, prefix):
    """PNGs of frozen and total time against memory size for the idle heaps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        say("plots skipped: matplotlib is not installed (make install adds it)")
        return []
    series = {}
    for r in rows:
        if r["workload"] == "idle" and r.get("ok"):
            series.setdefault((r["tool"], r["mode"]), {}).setdefault(r["size_mib"], []).append(r)
    paths = []
    for key, title in (("frozen_s", "frozen time (as the process saw it)"),
                       ("total_s", "total migration time")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (tool, mode), by_size in sorted(series.items()):
            xs = sorted(by_size)
            ys = [by_size[x][0][key] * 1e3 for x in xs]
            ax.plot(xs, ys, marker="o", label=f"{tool} {MODE_LABELS[mode]}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel("idle heap (MiB)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend()
        path = f"{prefix}-{key.split('_')[0]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a tiny run: a 16 MiB idle heap, stop-and-copy, no CRIU")
    p.add_argument("--sizes", nargs="+", type=int, help="idle heap sizes in MiB "
                   f"(default {' '.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--workloads", nargs="+", choices=("idle", "writer", "python", "sparse"),
                   default=["idle", "writer", "python", "sparse"])
    p.add_argument("--modes", nargs="+", choices=tuple(UMIG_MODES), default=list(UMIG_MODES))
    p.add_argument("--writer-mib", type=int, default=1024, help="writer heap (default 1024)")
    p.add_argument("--writer-rate", type=float, default=1.0, help="writer MiB/s (default 1)")
    p.add_argument("--python-mib", type=int, default=10, help="CPython heap (default 10)")
    p.add_argument("--repeat", type=int, default=1, help="runs per row (default 1)")
    p.add_argument("--criu", default="criu", help="the criu binary (default: criu on PATH)")
    p.add_argument("--no-criu", action="store_true", help="leave CRIU out")
    p.add_argument("--raise-pipe-max-size", action="store_true",
                   help="for the CRIU lazy-pages rows, raise the sysctl fs.pipe-max-size to "
                        f"{CRIU_LAZY_PIPE_MIN // MIB} MiB if it is lower, and put it back at the end")
    p.add_argument("--results", default=RESULTS_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--name", help="file name stem of the outputs (default: bench, or quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or QUICK_SIZES
        args.workloads, args.modes, args.no_criu = ["idle"], ["stop"], True
    args.sizes = args.sizes or DEFAULT_SIZES
    args.name = args.name or ("quick" if args.quick else "bench")
    return args


def plan(args, workloads, offered, criu, lazy_problem):
    """[(workload, tool, mode, why not or None)]."""
    jobs = []
    for w in workloads:
        for mode in args.modes:
            jobs.append((w, "umig", mode, offered[mode]))
            if criu and mode in CRIU_COUNTERPART:
                cmode = CRIU_COUNTERPART[mode]
                jobs.append((w, "criu", cmode, lazy_problem if cmode == "lazy-pages" else None))
    return jobs


def run(args):
    preflight()
    say(f"umig benchmark ({'quick' if args.quick else 'default'} set)")
    machine = machine_info()
    say(f"machine: {machine.get('cpu', '?')}, {machine['cores']} cores, "
        f"{machine.get('memory_gib', '?')} GiB, kernel {machine['kernel']}")
    offered = umig_modes()
    for mode in args.modes:
        say(f"umig {MODE_LABELS[mode]}: " + ("runs" if offered[mode] is None
                                            else f"skipped: {offered[mode]}"))
    criu, criu_why = (None, "left out (--no-criu)") if args.no_criu else criu_status(args.criu)
    say(f"CRIU: {'runs: ' + criu if criu else 'skipped: ' + criu_why}")

    workloads = make_workloads(args)
    rows = []
    workdir = tempfile.mkdtemp(prefix="umig-bench-")
    interrupted = False
    with Cleanup() as cleanup:
        lazy_problem = prepare_criu_lazy(args, cleanup) \
            if criu and any(CRIU_COUNTERPART.get(m) == "lazy-pages" for m in args.modes) else None
        jobs = plan(args, workloads, offered, criu, lazy_problem)
        cleanup.add("remove " + workdir, shutil.rmtree, workdir, True)
        cleanup.add("stop the workloads", kill_marked, workdir)
        become_subreaper()
        binaries = {"c": compile_c(open(os.path.join(HERE, "workload.c")).read(),
                                   os.path.join(workdir, "workload")),
                    "python": os.path.realpath(sys.executable),
                    "python_script": shutil.copy(os.path.join(HERE, "workload.py"), workdir)}
        total = len(jobs) * args.repeat
        n = 0
        try:
            for w, tool, mode, why_not in jobs:
                for run_no in range(args.repeat):
                    n += 1
                    head = f"[{n}/{total}] {w.label}, {tool} {MODE_LABELS[mode]}"
                    base = dict(workload=w.kind, label=w.label, size_mib=w.size_mib, tool=tool,
                                mode=mode, run=run_no, ok=False)
                    avail = mem_available()
                    if why_not is None and w.kind != "sparse" and avail is not None \
                            and w.size_mib * MIB * 2.5 > avail:
                        why_not = f"only {avail // MIB} MiB of memory available"
                    if why_not is not None:
                        say(f"{head}: skipped ({why_not})")
                        rows.append(Row(base, skipped=True, error=why_not))
                        continue
                    print(f"{head}: ", end="", flush=True)
                    started = time.monotonic()
                    if tool == "umig":
                        row = bench_umig(w, mode, binaries, workdir, run_no)
                    else:
                        row = bench_criu(w, mode, binaries, workdir, run_no, criu)
                    if row["ok"]:
                        say(f"total {ms(row['total_s'])} ms, frozen {ms(row['frozen_s'])} ms, "
                            f"{mib(row['bytes'])} MiB, memory verified "
                            f"({time.monotonic() - started:.1f} s)")
                    else:
                        say("FAILED: " + row["error"])
                    rows.append(row)
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: stopping everything the benchmark started")
    if interrupted:
        return rows, None
    say()
    say(f"memory moved per row; umig modes {', '.join(args.modes)}; "
        f"{args.repeat} run(s) each")
    summary = summarize(rows)
    print_table(summary)
    print_phases(summary)
    ratios = criu_ratios(summary)
    say()
    if criu:
        say("umig / CRIU (below 1: umig needs less):")
        for line in ratios or ["(no pair of rows succeeded on both sides)"]:
            say("  " + line)
    else:
        say(f"umig / CRIU ratios: none, CRIU {criu_why}")
    targets = check_targets(summary)
    say()
    say("targets:")
    for t in targets:
        say(f"  {t['result']:>4}  {t['target']}: {t['detail']}")

    os.makedirs(args.results, exist_ok=True)
    prefix = os.path.join(args.results, args.name)
    plots = plot(summary, prefix)
    doc = {"benchmark": args.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine,
           "umig_modes": {m: offered[m] or "runs" for m in args.modes},
           "criu": criu or f"skipped: {criu_why}",
           "rows": rows, "summary": summary, "criu_ratios": ratios, "targets": targets, "plots": plots}
    with open(prefix + ".json", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    say()
    say("written: " + ", ".join([prefix + ".json"] + plots))
    return rows, doc


def main(argv=None):
    args = parse_args(argv)
    rows = []
    try:
        rows, doc = run(args)
    except DemoError as e:
        say(f"BENCHMARK FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        doc = None
    if doc is None:
        return 130
    ran = [r for r in rows if not r.get("skipped")]
    return 0 if ran and all(r["ok"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
