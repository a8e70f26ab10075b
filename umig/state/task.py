"""The task's own attributes: name, working directory, umask, resource limits, personality, the
clear_child_tid address glibc registered with set_tid_address, interval timers (alarm,
setitimer), niceness and the OOM score adjustment."""
import os
import struct

from umig import procfs
from umig.errors import UmigError
from umig.ptrace import Buffer
from umig.restorer import RLIMIT_NAMES

SYS_PRCTL, PR_GET_TID_ADDRESS, SYS_GETITIMER = 157, 40, 36
ITIMERS = {0: "ITIMER_REAL", 1: "ITIMER_VIRTUAL", 2: "ITIMER_PROF"}
_ITIMERVAL = struct.Struct("<4q")  # it_interval {sec, usec}, it_value {sec, usec}
RLIM_INFINITY = 2 ** 64 - 1
NICE_FIELD = 19  # of /proc/PID/stat


def check(pid):
    """What /proc tells before freezing: POSIX timers and job-control stops do not move yet."""
    blockers = []
    if procfs.read_text(pid, "timers").strip():
        blockers.append(f"pid {pid} has POSIX timers (timer_create), which do not move yet")
    if procfs.status(pid)["State"].startswith("T"):
        blockers.append(f"pid {pid} is stopped (job control): continue it first")
    cwd = procfs.proc_path(pid, "cwd")
    path = os.readlink(cwd)
    if path.endswith(" (deleted)"):
        blockers.append(f"pid {pid}'s working directory {path[:-10]} was deleted")
    elif not procfs.same_file(cwd, path):
        blockers.append(f"pid {pid}'s working directory is another directory where umig looks")
    return blockers


def dump(frozen):
    """Asks the frozen process (dump.Frozen.ask); returns what makes the section once it answered."""
    pid = frozen.pid
    tid_address = Buffer(8)
    frozen.ask("prctl(PR_GET_TID_ADDRESS)", SYS_PRCTL, PR_GET_TID_ADDRESS, tid_address)
    timers = {which: Buffer(_ITIMERVAL.size) for which in ITIMERS}
    for which, timer in timers.items():
        frozen.ask("getitimer", SYS_GETITIMER, which, timer)
    section = {"comm": procfs.read_text(pid, "comm").rstrip("\n"), "cwd": os.readlink(procfs.proc_path(pid, "cwd")),
               "umask": int(frozen.status["Umask"], 8),
               "personality": int(procfs.read_text(pid, "personality"), 16),
               "rlimits": _rlimits(pid),
               "nice": int(procfs.stat_fields(pid)[NICE_FIELD]),
               "oom_score_adj": int(procfs.read_text(pid, "oom_score_adj")),
               "cmdline": procfs.read_bytes(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()}

    def answered():
        itimers = []
        for which, timer in timers.items():
            interval_sec, interval_usec, value_sec, value_usec = _ITIMERVAL.unpack(timer.data)
            if not (value_sec or value_usec) and (interval_sec or interval_usec):
                # A periodic ITIMER_REAL that expired while the process was held: the kernel
                # re-arms it only as its SIGALRM (pending, and carried) is taken, and reports it
                # disarmed meanwhile. Armed again where it lands, it fires an interval later.
                value_sec, value_usec = interval_sec, interval_usec
            if value_sec or value_usec:
                itimers.append([which, interval_sec, interval_usec, value_sec, value_usec])
        return dict(section, tid_address=int.from_bytes(tid_address.data, "little"), itimers=itimers)
    return answered


def _rlimits(pid):
    """[resource, soft, hard] from /proc/PID/limits, whose lines follow the RLIMIT_* numbers:
    prlimit() on another user's process needs CAP_SYS_RESOURCE, which root may lack."""
    rows = procfs.read_text(pid, "limits").splitlines()[1:]
    rlimits = []
    for res in sorted(RLIMIT_NAMES):
        soft, hard = rows[res][26:].split()[:2]  # the name column is 25 characters wide
        rlimits.append([res] + [RLIM_INFINITY if value == "unlimited" else int(value) for value in (soft, hard)])
    return rlimits


def check_target(section):
    if not os.path.isdir(section["cwd"]):
        raise UmigError(f"working directory {section['cwd']} is missing on the target")


def restore(restorer, section):
    restorer.chdir(section["cwd"])
    restorer.umask(section["umask"])
    for res, cur, limit in section["rlimits"]:
        restorer.rlimit(res, cur, limit)
    restorer.personality(section["personality"])
    restorer.comm(section["comm"].encode())
    restorer.tid_address(section["tid_address"])
    # The timers run on from what was left of them when the process was frozen.
    for which, interval_sec, interval_usec, value_sec, value_usec in section["itimers"]:
        restorer.itimer(which, (interval_sec, interval_usec), (value_sec, value_usec))


def restore_from_outside(pid, section):
    """What the agent sets from outside: niceness and the OOM score adjustment."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, section["nice"])
        with open(procfs.proc_path(pid, "oom_score_adj"), "w") as f:
            f.write(str(section["oom_score_adj"]))
    except OSError as e:
        raise UmigError(f"setting the niceness or OOM score of pid {pid} failed: {e.strerror}") from None


def describe(section):
    def limit(value):
        return "unlimited" if value == RLIM_INFINITY else str(value)
    limits = [f"{RLIMIT_NAMES[res][7:].lower()}={limit(cur)}/{limit(hard)}" for res, cur, hard in section["rlimits"]]
    lines = [f"task: {section['comm']!r} ({section['cmdline']}), cwd {section['cwd']}, umask {section['umask']:03o}, "
             f"personality {section['personality']:#x}, nice {section['nice']}, oom_score_adj {section['oom_score_adj']}",
             f"  rlimits {' '.join(limits)}"]
    for which, interval_sec, interval_usec, value_sec, value_usec in section["itimers"]:
        lines.append(f"  {ITIMERS[which]} fires in {value_sec + value_usec / 1e6:.3f} s, "
                     f"every {interval_sec + interval_usec / 1e6:.3f} s")
    return lines
