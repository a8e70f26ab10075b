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
go through ``criu dump`` + ``criu restore`` with images in tmpfs.

Every row gets a fresh agent on a free loopback port, so its CPU time and peak RSS
belong to that row alone. Results: a table with targets, benchmarks/results/NAME.json,
and NAME-frozen.png / NAME-total.png when matplotlib is installed.
"""

import argparse
import ctypes
import json
import os
import platform
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
    Agent, Cleanup, DemoError, alive, compile_c, parse_json_output, preflight, say,
    umig_command, wait_dead,
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

def run_measured(cmd, timeout):
    """Run cmd to completion. Returns (exit code, stdout, stderr, wall s, CPU s, peak RSS
    bytes); CPU and peak RSS come from wait4's rusage (the kernel's hiwater RSS, what
    VmHWM showed while it ran), so they include the children it waited for."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        # A session of its own: a Ctrl-C reaches it once, from us, below.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        done = {}

        def reap():
            _, status, usage = os.wait4(proc.pid, 0)
            done["status"], done["usage"] = status, usage

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        try:
            waiter.join(timeout)
            if waiter.is_alive():
                raise DemoError(f"`{' '.join(map(str, cmd[:4]))} ...` did not finish in {timeout:.0f} s")
        except BaseException:
            # SIGINT first: an interrupted migration must leave its source running.
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
                if not waiter.is_alive():
                    break
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
                waiter.join(grace)
            raise
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(done["status"])  # Popen must not wait again
        usage = done["usage"]
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), wall, usage.ru_utime + usage.ru_stime,
                usage.ru_maxrss * 1024)


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


def criu_lazy_problem():
    """Why the CRIU lazy-pages rows do not run. They need fs.pipe-max-size >= 4 MiB, which
    the machines this harness was written on lack (and it changes no sysctls), so the
    sequence was never exercised; rows that never ran are not offered as figures."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = f"{int(f.read()) // 1024} KiB"
    except OSError:
        size = "unknown"
    return (f"not in the harness: CRIU lazy-pages needs fs.pipe-max-size >= "
            f"{CRIU_LAZY_PIPE_MIN // MIB} MiB (here {size}), so it was never exercised")


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


def frozen_figures(row, after, window):
    """The process's own view: its longest gap since the check before the move."""
    gap_s = after["max_gap_ns"] / 1e9
    gap_end = after["gap_end_ns"] / 1e9
    row["frozen_s"] = gap_s
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
            agent_peak_rss=agent_rss, client_peak_rss=cli_rss)
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


def bench_criu(workload, mode, binaries, workdir, run, criu):
    row = Row(workload=workload.kind, label=workload.label, size_mib=workload.size_mib,
              tool="criu", mode=mode, run=run)
    rundir = tempfile.mkdtemp(prefix=f"{workload.kind}-", dir=workdir)
    # tmpfs, so CRIU is not measured against a disk.
    images = tempfile.mkdtemp(prefix="umig-bench-criu-", dir="/dev/shm")
    proc = None
    timeout = 120 + workload.size_mib / 10
    try:
        proc, _, baseline = start_workload(workload, binaries, rundir)
        pid = proc.pid
        row["source_pid"] = row["target_pid"] = pid
        row["baseline_gap_s"] = baseline["max_gap_ns"] / 1e9
        window = [time.monotonic()]
        steps = [("dump", criu_cmd(criu, "dump", images, "-t", pid)),
                 ("restore", criu_cmd(criu, "restore", images, "-d"))]
        wall = cpu = rss = 0.0
        for verb, cmd in steps:
            if verb == "restore":
                proc.wait(timeout=10)  # the dumped source must free its PID first
            rc, out, err, w, c, r = run_measured(cmd, timeout)
            if rc != 0:
                raise DemoError(f"criu {verb} failed (exit {rc}): {criu_log(images, verb)}")
            wall, cpu, rss = wall + w, cpu + c, max(rss, r)
        window.append(time.monotonic())
        after = report(pid, rundir, workload.fill_timeout())
        frozen_figures(row, after, window)
        row.update(ok=True, total_s=wall, tool_frozen_s=None, cli_wall_s=wall,
                   bytes=image_bytes(images), bytes_source="CRIU pages-*.img sizes",
                   cpu_s=cpu, client_cpu_s=cpu, agent_cpu_s=0.0,
                   client_peak_rss=rss, agent_peak_rss=None)
        row["gb_per_s"] = row["bytes"] / wall / 1e9 if wall > 0 else None
        return row
    except (DemoError, subprocess.TimeoutExpired) as e:
        return row.fail(e)
    finally:
        end_processes(proc)
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
            if isinstance(value, float) or key in ("bytes", "pages", "agent_peak_rss", "client_peak_rss"):
                values = sorted(r[key] for r in runs if r.get(key) is not None)
                row[key] = values[len(values) // 2] if values else None
        summary.append(row)
    return summary


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
            frozen = ms(r["frozen_s"]) + ("" if r["gap_in_window"] else "?")
            cells = head + [ms(r["total_s"]), frozen, ms(r.get("tool_frozen_s")), mib(r["bytes"]),
                            gbps, f"{r['cpu_s']:.2f}", mib(r.get("agent_peak_rss")),
                            mib(r.get("client_peak_rss")), "ok"]
        say(" ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols)))
    say()
    say("total: the tool's own total (umig --json total_s; CRIU: dump + restore wall time).")
    say("frozen: the longest gap in the process's own CLOCK_MONOTONIC loop (a '?' marks a gap")
    say("  outside the migration's window, i.e. the move froze it less than some other hiccup);")
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
    p.add_argument("--results", default=RESULTS_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--name", help="file name stem of the outputs (default: bench, or quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or QUICK_SIZES
        args.workloads, args.modes, args.no_criu = ["idle"], ["stop"], True
    args.sizes = args.sizes or DEFAULT_SIZES
    args.name = args.name or ("quick" if args.quick else "bench")
    return args


def plan(args, workloads, offered, criu):
    """[(workload, tool, mode, why not or None)]."""
    jobs = []
    lazy_problem = criu_lazy_problem() if criu else None
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
    jobs = plan(args, workloads, offered, criu)
    rows = []
    workdir = tempfile.mkdtemp(prefix="umig-bench-")
    interrupted = False
    with Cleanup() as cleanup:
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
