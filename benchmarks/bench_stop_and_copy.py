#!/usr/bin/env python3
"""Stop-and-copy benchmark: how long does umig take to move a process of a given size?

Run with ``make bench`` (as root), or ``.venv/bin/python benchmarks/bench_stop_and_copy.py
[--sizes 16 256 1024] [--repeat N]``.

It starts one umig agent on loopback and, for each size, a small C program that fills that
many MiB of anonymous memory with a known pattern and then waits. Each program is migrated
to the agent with ``umig migrate PID 127.0.0.1:PORT --json``; afterwards the migrated
process is asked (SIGUSR1) to check every word of its memory and write the verdict to a
file, so a run counts only if the process really continues with its memory intact.

It prints a table (size, total time, frozen time, effective GB/s = bytes / total_s) and
one JSON line with the same numbers, also written to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umig.demo import (  # noqa: E402  (after the path fix-up)
    Agent, Cleanup, DemoError, alive, compile_c, kill_by_exe, migrate, preflight, say,
    wait_dead,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The process under test. It fills SIZE_MIB MiB with pattern(i) (word i of the region),
# writes DIR/ready, and then sleeps in short naps; on SIGUSR1 it checks every word and
# writes DIR/result ("ok ..." or "bad ..."), renaming it into place so the reader never
# sees half a file.
MEMHOG_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig)
{
    (void)sig;
    check_requested = 1;
}

static uint64_t pattern(uint64_t i)
{
    return (i + 1) * 0x9E3779B97F4A7C15ull ^ 0x5A5A5A5AA5A5A5A5ull;
}

static void put_file(const char *dir, const char *name, const char *text)
{
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        text += n;
        len -= (size_t)n;
    }
    close(fd);
    rename(tmp, path);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SIZE_MIB DIR\n", argv[0]);
        return 2;
    }
    uint64_t size = strtoull(argv[1], NULL, 10) << 20;
    const char *dir = argv[2];
    uint64_t words = size / sizeof(uint64_t);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0) {
        perror("sigaction");
        return 1;
    }

    uint64_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (uint64_t i = 0; i < words; i++)
        mem[i] = pattern(i);

    char msg[256];
    snprintf(msg, sizeof msg, "ready pid %ld words %llu\n", (long)getpid(),
             (unsigned long long)words);
    put_file(dir, "ready", msg);

    for (;;) {
        while (!check_requested) {
            struct timespec nap = { 0, 50 * 1000 * 1000 };
            nanosleep(&nap, NULL); /* EINTR or not, look at the flag again */
        }
        check_requested = 0;
        uint64_t bad = 0, first_bad = 0;
        for (uint64_t i = 0; i < words; i++) {
            if (mem[i] != pattern(i)) {
                if (bad++ == 0)
                    first_bad = i;
            }
        }
        if (bad == 0)
            snprintf(msg, sizeof msg, "ok pid %ld words %llu\n", (long)getpid(),
                     (unsigned long long)words);
        else
            snprintf(msg, sizeof msg, "bad pid %ld words %llu wrong %llu first_at_byte %llu\n",
                     (long)getpid(), (unsigned long long)words, (unsigned long long)bad,
                     (unsigned long long)(first_bad * sizeof(uint64_t)));
        put_file(dir, "result", msg);
    }
}
"""


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
        time.sleep(0.05)
    raise DemoError(f"no {os.path.basename(path)} from the process after {timeout:.0f} s")


def verify_memory(pid, rundir, timeout):
    """Ask PID to check its memory; return its verdict line, raise unless it is ok."""
    result = os.path.join(rundir, "result")
    try:
        os.unlink(result)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    verdict = wait_for_file(result, timeout, pid)
    if not verdict.startswith("ok"):
        raise DemoError(f"memory check in PID {pid} failed: {verdict}")
    return verdict


def mem_available_mib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def bench_one(size_mib, memhog, workdir, agent, run):
    rundir = os.path.join(workdir, f"{size_mib}-{run}")
    os.mkdir(rundir)
    fill_timeout = 60 + size_mib / 50
    proc = subprocess.Popen([memhog, str(size_mib), rundir], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pid = proc.pid
    target_pid = None
    try:
        wait_for_file(os.path.join(rundir, "ready"), fill_timeout, pid)
        verify_memory(pid, rundir, fill_timeout)  # the check itself works before we move it

        result, wall = migrate(pid, agent.address, timeout=120 + size_mib / 10)
        target_pid = int(result["target_pid"])
        if not wait_dead(pid, 10, proc):
            raise DemoError(f"the source PID {pid} still runs after the migration")
        verdict = verify_memory(target_pid, rundir, fill_timeout)
        total_s, frozen_s = float(result["total_s"]), float(result["frozen_s"])
        nbytes = int(result["bytes"])
        return {
            "size_mib": size_mib,
            "run": run,
            "ok": True,
            "source_pid": pid,
            "target_pid": target_pid,
            "total_s": total_s,
            "frozen_s": frozen_s,
            "cli_wall_s": round(wall, 6),
            "pages": int(result["pages"]),
            "bytes": nbytes,
            "gb_per_s": nbytes / total_s / 1e9 if total_s > 0 else None,
            "verdict": verdict,
        }
    finally:
        for p in (pid, target_pid):
            if p is not None and alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(timeout=10)  # reap the source (our child) if it is still around
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(rundir, ignore_errors=True)


def print_table(rows):
    say()
    say(f"{'size':>9} {'total':>10} {'frozen':>10} {'pages':>9} {'moved':>11} {'GB/s':>7}")
    say(f"{'(MiB)':>9} {'(ms)':>10} {'(ms)':>10} {'':>9} {'(MiB)':>11} {'':>7}")
    for r in rows:
        if not r["ok"]:
            label = "SKIPPED" if r.get("skipped") else "FAILED"
            reason = [line for line in r["error"].splitlines() if line.strip()][-1]
            say(f"{r['size_mib']:>9} {label:>10}  {reason[:70]}")
            continue
        gbps = f"{r['gb_per_s']:.2f}" if r["gb_per_s"] is not None else "-"
        say(f"{r['size_mib']:>9} {r['total_s'] * 1e3:>10.1f} {r['frozen_s'] * 1e3:>10.1f} "
            f"{r['pages']:>9} {r['bytes'] / 2**20:>11.1f} {gbps:>7}")
    say()
    say("total: the whole `umig migrate` (freeze, dump, stream, restore, confirm, release);")
    say("frozen: how long the process could not run; GB/s: bytes moved / total (1 GB = 1e9 B).")


def parse_sizes(values):
    sizes = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                n = int(part)
                if n <= 0:
                    raise argparse.ArgumentTypeError("sizes must be positive")
                sizes.append(n)
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["16", "256", "1024"],
                        help="memory sizes in MiB (default: 16 256 1024; commas work too)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "stop_and_copy.json"),
                        help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes)

    rows = []
    try:
        preflight()
        workdir = tempfile.mkdtemp(prefix="umig-bench-")
        memhog = os.path.join(workdir, "memhog")
        with Cleanup() as cleanup:
            cleanup.add("remove " + workdir, shutil.rmtree, workdir, True)
            compile_c(MEMHOG_C, memhog)
            agent = Agent("bench", workdir)
            cleanup.add("stop the agent", agent.stop)
            agent.start()
            cleanup.add("stop the test processes", kill_by_exe, memhog)
            say(f"agent: umig agent --listen {agent.listen} --name bench (PID {agent.proc.pid})")

            for size in sizes:
                avail = mem_available_mib()
                # The frozen source and the restored copy both hold the memory for a while.
                if avail is not None and size * 2.5 > avail:
                    say(f"{size:>6} MiB: skipped, only {avail} MiB of memory available")
                    rows.append({"size_mib": size, "ok": False, "skipped": True,
                                 "error": f"skipped: only {avail} MiB available"})
                    continue
                for run in range(args.repeat):
                    print(f"{size:>6} MiB (run {run + 1}/{args.repeat}): ", end="", flush=True)
                    try:
                        row = bench_one(size, memhog, workdir, agent, run)
                    except DemoError as e:
                        say(f"FAILED: {e}")
                        say(agent.log_tail())
                        rows.append({"size_mib": size, "run": run, "ok": False, "error": str(e)})
                        continue
                    rows.append(row)
                    say(f"total {row['total_s'] * 1e3:.1f} ms, "
                        f"frozen {row['frozen_s'] * 1e3:.1f} ms, "
                        f"{row['bytes'] / 2**20:.1f} MiB moved; memory verified after the move")
    except DemoError as e:
        say(f"BENCHMARK FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        say("\nInterrupted; everything the benchmark started has been stopped.")
        return 130

    print_table(rows)
    report = {
        "benchmark": "stop_and_copy",
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": rows,
    }
    line = json.dumps(report, sort_keys=True)
    say(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(line + "\n")
        say(f"(written to {args.output})")
    ran = [r for r in rows if not r.get("skipped")]
    return 0 if ran and all(r["ok"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
