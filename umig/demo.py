"""The umig demo: live-migrate a running process a -> b -> a on this machine.

Run it with ``make demo`` (or, once installed, ``python -m umig.demo``) as root.

It starts two umig agents on loopback (node-a and node-b), compiles and starts a tiny C
program that appends "tick N pid P" to a log file once a second, migrates that process to
node-b and back to node-a with ``umig migrate PID HOST:PORT --json``, shows that the log
goes on without losing or repeating a tick, and removes everything it started, also when
a step fails or you press Ctrl-C.

The helpers in this module (agents, compiling C, running the CLI, cleaning up) are also
used by benchmarks/bench_stop_and_copy.py.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

# The demo process. Plain C, no shell: it opens its log once with O_APPEND (so every
# write lands at the end of the file, whoever else wrote in between, and the reopened
# file on the target behaves the same), writes one line per second, and sleeps with
# nanosleep, going back to sleep for the remaining time when a signal or the migration
# interrupts it (EINTR).
TICKER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void sleep_exactly(time_t seconds)
{
    struct timespec left = { seconds, 0 };
    while (nanosleep(&left, &left) == -1 && errno == EINTR)
        ; /* interrupted: sleep for what is left */
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s LOGFILE\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    for (unsigned long tick = 0;; tick++) {
        char line[64];
        /* getpid() asks the kernel every time: after a migration it shows the PID
           the process sees in its (possibly new) PID namespace. */
        int len = snprintf(line, sizeof line, "tick %lu pid %ld\n", tick, (long)getpid());
        if (write_all(fd, line, (size_t)len) < 0) {
            perror("write");
            return 1;
        }
        sleep_exactly(1);
    }
}
"""

AGENT_READY_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 300.0


class DemoError(Exception):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------- output

def say(text="", indent=0):
    prefix = " " * indent
    for line in text.splitlines() or [""]:
        print(prefix + line if line else "", flush=True)


def explain(text, indent=4):
    """Print a paragraph for the reader, wrapped to 88 columns."""
    for para in textwrap.dedent(text).strip().split("\n\n"):
        say(textwrap.fill(" ".join(para.split()), width=88 - indent), indent)
        say()


def step(number, title):
    say()
    say(f"=== Step {number}: {title} " + "=" * max(3, 74 - len(title)))
    say()


def human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- processes

def umig_command(*args):
    """The umig CLI, run with this interpreter (so the venv's umig is the one used)."""
    return [sys.executable, "-m", "umig", *map(str, args)]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise DemoError("no C compiler found (install gcc)")


def compile_c(source, output, flags=("-O2",)):
    """Compile one C source (a string) to the executable `output`."""
    src = output + ".c"
    with open(src, "w") as f:
        f.write(source)
    cmd = [find_compiler(), *flags, "-Wall", "-o", output, src]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise DemoError("compiling failed: " + " ".join(cmd) + "\n" + res.stderr)
    return output


def proc_state(pid):
    """The one-letter state from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def alive(pid):
    """True while PID exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def wait_dead(pid, timeout, popen=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()  # reap it if it is our child
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def ns_pids(pid):
    """The NSpid line of /proc/PID/status: the PID in each nested PID namespace,
    outermost (the host's view) first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def kill_by_exe(path):
    """SIGKILL every process running the executable `path` (by /proc/PID/exe or argv[0]).
    The executables we start live in our own temporary directory, so this never hits
    anything else. Returns the PIDs signalled."""
    path = os.path.realpath(path)
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        match = False
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            match = exe == path or exe == path + " (deleted)"
        except OSError:
            pass
        if not match:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
                match = argv0 == path
            except OSError:
                pass
        if match:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def stop_started(exe, popens):
    """Kill every process running `exe`, and reap those that are our own children."""
    kill_by_exe(exe)
    for popen in popens:
        if popen.poll() is None:
            try:
                popen.kill()
                popen.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def run_cli(args, timeout):
    """Run a umig CLI command, returning (returncode, stdout, stderr). On Ctrl-C the
    command gets SIGINT and a few seconds to undo what it did (a migration that is cut
    short must leave the source running) before it is killed."""
    # A session of its own, so that a Ctrl-C reaches it once, from us, below.
    proc = subprocess.Popen(umig_command(*args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=10)
            except BaseException:
                proc.kill()
                proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise DemoError(f"`umig {' '.join(map(str, args))}` did not finish in {timeout:.0f} s")
        raise
    return proc.returncode, out, err


def parse_json_output(stdout):
    """The one JSON object `--json` prints (tolerating other lines around it)."""
    text = stdout.strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    raise DemoError("no JSON object in the output of `umig migrate --json`:\n" + stdout)


def migrate(pid, address, timeout=MIGRATE_TIMEOUT):
    """`umig migrate PID ADDRESS --json`; returns (result dict, wall-clock seconds)."""
    args = ["migrate", pid, address, "--json"]
    started = time.monotonic()
    rc, out, err = run_cli(args, timeout)
    wall = time.monotonic() - started
    if rc != 0:
        raise DemoError(f"`umig {' '.join(map(str, args))}` failed (exit {rc}):\n"
                        + (err.strip() or out.strip()))
    result = parse_json_output(out)
    missing = [k for k in ("source_pid", "target_pid", "total_s", "frozen_s", "pages", "bytes")
               if k not in result]
    if missing:
        raise DemoError("`umig migrate --json` left out " + ", ".join(missing) + ": " + out.strip())
    return result, wall


class Agent:
    """One `umig agent` subprocess listening on 127.0.0.1:PORT."""

    def __init__(self, name, workdir, port=None):
        self.name = name
        self.port = port or free_port()
        self.listen = f"tcp://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"agent-{name}.log")
        self.proc = None

    def start(self):
        self._log = open(self.log_path, "wb")
        # A session of its own: Ctrl-C in the terminal reaches only us, and we stop the
        # agent (and whatever it restored) in order.
        self.proc = subprocess.Popen(
            umig_command("agent", "--listen", self.listen, "--name", self.name),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"agent {self.name} exited with status {self.proc.returncode}:\n"
                                + self.log_tail())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise DemoError(f"agent {self.name} is not listening on {self.listen} after "
                        f"{AGENT_READY_TIMEOUT:.0f} s:\n" + self.log_tail())

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join("    | " + line for line in tail) or "    (empty log)"

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is not None:
                return
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:  # the agent and anything left in its process group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=5)
        finally:
            self._log.close()


class Cleanup:
    """Undo steps run last-first on exit, whatever happened; SIGTERM and SIGHUP are
    turned into KeyboardInterrupt so they clean up too."""

    def __init__(self):
        self.actions = []

    def add(self, what, fn, *args):
        self.actions.append((what, fn, args))

    def __enter__(self):
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupt)
        return self

    def __exit__(self, *exc):
        # Don't let a second Ctrl-C cut the clean-up short.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self.actions:
                what, fn, args = self.actions.pop()
                try:
                    fn(*args)
                except Exception as e:  # keep cleaning
                    say(f"  (clean-up: {what} failed: {e})")
        finally:
            signal.signal(signal.SIGINT, old)
        return False


def preflight():
    if not sys.platform.startswith("linux"):
        raise DemoError("umig works on Linux only")
    if os.geteuid() != 0:
        raise DemoError("run this as root: umig uses ptrace and creates PID namespaces "
                        "(try: sudo make demo)")


# --------------------------------------------------------------------------- the demo

def read_ticks(log_path):
    """[(tick, pid)] from the log."""
    ticks = []
    try:
        with open(log_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4 and parts[0] == "tick" and parts[2] == "pid":
                    ticks.append((int(parts[1]), int(parts[3])))
    except FileNotFoundError:
        pass
    return ticks


def wait_for_ticks(log_path, count, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_ticks(log_path)) >= count:
            return True
        time.sleep(0.1)
    return len(read_ticks(log_path)) >= count


def check_sequence(ticks):
    """Every tick exactly once, in order: nothing lost, nothing written twice."""
    for i, (tick, _) in enumerate(ticks):
        if tick != i:
            raise DemoError(f"the log is broken at line {i + 1}: expected tick {i}, found "
                            f"tick {tick} (a tick was lost or written twice)")


def print_log(ticks, hops, last=None):
    """Print the log with a marker where each migration happened."""
    marks = {}
    for at, label in hops:
        marks.setdefault(at, []).append(label)
    first = 0 if last is None else max(0, len(ticks) - last)
    if first > 0:
        say(f"      ... ({first} earlier lines)")
    for i in range(first, len(ticks)):
        for label in marks.get(i, []):
            say(f"      ---------- {label} ----------")
        tick, pid = ticks[i]
        say(f"      tick {tick:<3} pid {pid}")


def hop(number, pid, src, dst, log_path, hops, seen_pids, explained, popen=None):
    """Migrate `pid` from agent `src` to agent `dst` and check the result."""
    step(number, f"migrate PID {pid}: {src.name} -> {dst.name}")
    explain(f"""
        Now: umig migrate {pid} {dst.address} --json

        umig attaches to the process with ptrace and freezes it, reads its whole state
        (registers, memory mappings and their pages, open files and offsets, signal
        handlers, working directory, limits, credentials) and streams it over ZeroMQ to
        the agent {dst.name}. There the agent starts the tiny freestanding restorer, which
        rebuilds the address space piece by piece and finally becomes the process. Only
        when {dst.name} confirms that the copy is complete does umig kill the frozen
        original; if anything fails before that, the original simply resumes.
        """)
    ticks = read_ticks(log_path)
    before = len(ticks)
    own_pid = ticks[-1][1] if ticks else None  # the PID the process saw itself as so far
    result, wall = migrate(pid, dst.address)
    target_pid = int(result["target_pid"])
    seen_pids.append(target_pid)
    hops.append((before, f"{src.name} -> {dst.name}: host PID {pid} -> {target_pid}"))

    say(f"    done: source PID {result['source_pid']} on {src.name} -> "
        f"target PID {target_pid} on {dst.name} ({result.get('target', dst.address)})")
    say(f"    total time        {float(result['total_s']) * 1000:8.1f} ms   "
        f"(the whole migration; the CLI call took {wall:.2f} s with Python start-up)")
    say(f"    frozen time       {float(result['frozen_s']) * 1000:8.1f} ms   "
        f"(how long the process could not run)")
    say(f"    memory moved      {int(result['pages']):8d} pages, {human_bytes(result['bytes'])}")
    extra = {k: v for k, v in result.items()
             if k not in ("source_pid", "target_pid", "target", "total_s", "frozen_s",
                          "pages", "bytes") and isinstance(v, (str, int, float, bool))}
    if extra:
        say("    also reported:    " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    say()

    # The original must be gone: two copies must never run at once.
    if not wait_dead(pid, 10, popen):
        raise DemoError(f"the source PID {pid} is still running after the migration")
    if not alive(target_pid):
        raise DemoError(f"the migrated process (host PID {target_pid}) is not running")
    say(f"    checked: PID {pid} is gone, PID {target_pid} is running.")

    nspids = ns_pids(target_pid)
    if len(nspids) > 1:
        say(f"    /proc/{target_pid}/status says NSpid: {' '.join(map(str, nspids))}"
            f"   (host PID first, then the PID inside its namespace)")
        say()
        if not explained:
            explain(f"""
                Both agents run on this one machine, and while {dst.name} restored the
                process, the frozen original still existed, so the process's own PID was
                taken. The agent therefore restored it into a new PID namespace, where it
                has {"its old PID" if nspids[-1] == own_pid else "PID"} {nspids[-1]}
                {"again" if nspids[-1] == own_pid else ""}: that is what getpid() returns
                inside it, and what the log prints from now on. The host sees it as PID
                {target_pid}; that
                host PID is what --json reports as target_pid, and what we migrate next.
                Between real machines the PID is usually free and kept as it is.
                """)
            explained.append(True)
        else:
            explain(f"""
                Again in a PID namespace of its own: PID {nspids[-1]} inside, PID
                {target_pid} on the host.
                """)
    elif nspids:
        explain(f"""
            It runs as PID {target_pid} directly in the host's PID namespace.
            """)

    say("    Waiting for the process to write two more ticks on its new node...")
    if not wait_for_ticks(log_path, before + 2, timeout=10):
        raise DemoError(f"the log stopped growing after the migration to {dst.name}:\n"
                        + "\n".join(f"tick {t} pid {p}" for t, p in read_ticks(log_path)[-5:]))
    ticks = read_ticks(log_path)
    check_sequence(ticks)
    say()
    print_log(ticks, hops, last=8)
    say()
    return target_pid


def run_demo(args):
    say(textwrap.dedent("""
        umig demo: live migration of a running Linux process
        ====================================================
        We start two umig agents ("nodes") on this machine, run a small unmodified C
        program that writes a line to a log every second, and move that running process
        from node-a to node-b and back while it keeps counting. Nothing in the program
        knows about umig.
        """).strip())
    preflight()

    workdir = tempfile.mkdtemp(prefix="umig-demo-")
    ticker = os.path.join(workdir, "ticker")
    log_path = os.path.join(workdir, "ticks.log")

    with Cleanup() as cleanup:
        cleanup.add("remove " + workdir, shutil.rmtree, workdir, True)
        agents = []
        try:
            step(1, "compile the demo program")
            compile_c(TICKER_C, ticker)
            say(f"    {ticker}: appends 'tick N pid P' to {log_path} every second.")
            say()
            explain("""
                It opens the log once, with O_APPEND, and sleeps with nanosleep, going back to
                sleep if a signal interrupts it. The open file, its offset and the sleep are
                all part of the state umig has to carry across.
                """)

            step(2, "start two agents")
            explain("""
                An agent is the receiving end: it listens on a ZeroMQ socket and rebuilds
                processes sent to it. On a real cluster each machine runs one; here both run
                on loopback, on two ports.
                """)
            for name in ("node-a", "node-b"):
                agent = Agent(name, workdir)
                cleanup.add("stop agent " + name, agent.stop)
                agent.start()
                agents.append(agent)
                say(f"    {name}: umig agent --listen {agent.listen} --name {name}"
                    f"   (PID {agent.proc.pid})")
            node_a, node_b = agents
            # Runs before the agents stop (clean-up runs last-first): the demo process,
            # wherever it ended up, and anything left of it.
            started = []
            cleanup.add("stop the demo process", stop_started, ticker, started)

            step(3, "start the demo process on node-a")
            popen = subprocess.Popen([ticker, log_path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            started.append(popen)
            pid = popen.pid
            seen_pids = [pid]
            say(f"    {ticker} {log_path}   (PID {pid})")
            say()
            explain("""
                It starts on this machine, which plays node-a: a process migrated to node-a
                would live right here. Its stdin, stdout and stderr are /dev/null (character
                devices) and fd 3 is the log (a regular file): both kinds umig can move.
                """)
            if not wait_for_ticks(log_path, 3, timeout=10):
                raise DemoError("the demo process did not start ticking")
            print_log(read_ticks(log_path), [])

            step(4, f"ask umig whether PID {pid} can be migrated")
            say(f"    umig check {pid}")
            rc, out, err = run_cli(["check", pid], timeout=60)
            for line in (out + err).strip().splitlines():
                say("      " + line)
            say()
            if rc != 0:
                raise DemoError(f"`umig check {pid}` refused (exit {rc})")
            explain("""
                check looks at the process without stopping it and says whether umig can move
                it, and if not, what stands in the way (for example a second thread, or a
                socket or pipe among its open files).
                """)

            hops, explained = [], []
            pid_b = hop(5, pid, node_a, node_b, log_path, hops, seen_pids, explained, popen)
            pid_a = hop(6, pid_b, node_b, node_a, log_path, hops, seen_pids, explained)

            step(7, "the whole log")
            ticks = read_ticks(log_path)
            check_sequence(ticks)
            print_log(ticks, hops)
            say()
            own = list(dict.fromkeys(p for _, p in ticks))  # in order of appearance
            explain(f"""
                {len(ticks)} ticks, numbered 0 to {len(ticks) - 1} without a gap or a repeat,
                written by one process that lived at host PIDs {', '.join(map(str, seen_pids))}
                in turn, while seeing itself as PID {', then '.join(map(str, own))}
                {"throughout" if len(own) == 1 else ""}. Its counter,
                its open log file and its sleep all survived both moves.
                """)

            step(8, "clean up")
            say(f"    stopping the demo process (host PID {pid_a}), both agents, and removing "
                f"{workdir}")
        except DemoError as e:
            logs = "".join(f"\n\nlog of agent {a.name}:\n{a.log_tail()}" for a in agents)
            raise DemoError(str(e) + logs) from None

    # Cleanup has run here (also on failure and Ctrl-C).
    say()
    say("Demo finished: the process moved node-a -> node-b -> node-a and never missed a tick.")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m umig.demo",
        description="Migrate a ticking process node-a -> node-b -> node-a on this machine "
                    "(needs root).")
    parser.parse_args(argv)
    try:
        return run_demo(parser)
    except DemoError as e:
        say()
        say(f"DEMO FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        say()
        say("Interrupted; everything the demo started has been stopped.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
