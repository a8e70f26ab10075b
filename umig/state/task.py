"""The task's own attributes: name, working directory, umask, resource limits, personality and the
clear_child_tid address that glibc registered with set_tid_address."""
import os
import resource

from umig import procfs
from umig.errors import UmigError

SYS_PRCTL, PR_GET_TID_ADDRESS = 157, 40
RLIMIT_NAMES = {getattr(resource, name): name for name in dir(resource) if name.startswith("RLIMIT_")}
RLIM_INFINITY = 2 ** 64 - 1


def dump(frozen):
    pid = frozen.pid
    status = procfs.status(pid)
    frozen.syscall_checked("prctl(PR_GET_TID_ADDRESS)", SYS_PRCTL, PR_GET_TID_ADDRESS, frozen.scratch)
    rlimits = []
    for res in sorted(RLIMIT_NAMES):
        cur, limit = resource.prlimit(pid, res)
        rlimits.append([res, cur % (RLIM_INFINITY + 1), limit % (RLIM_INFINITY + 1)])
    return {"comm": status["Name"], "cwd": os.readlink(procfs.proc_path(pid, "cwd")),
            "umask": int(status["Umask"], 8),
            "personality": int(procfs.read_text(pid, "personality"), 16),
            "rlimits": rlimits,
            "tid_address": int.from_bytes(frozen.read(frozen.scratch, 8), "little"),
            "cmdline": procfs.read_bytes(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()}


def check_target(section):
    if not os.path.isdir(section["cwd"]):
        raise UmigError(f"working directory {section['cwd']} is missing on the target")


def restore(restorer, section):
    restorer.chdir(section["cwd"])
    restorer.umask(section["umask"])
    for res, cur, limit in section["rlimits"]:
        restorer.rlimit(res, cur, limit)
    restorer.personality(section["personality"])
    restorer.comm(section["comm"].encode()[:15])
    restorer.tid_address(section["tid_address"])


def describe(section):
    def limit(value):
        return "unlimited" if value == RLIM_INFINITY else str(value)
    changed = [f"{RLIMIT_NAMES[res][7:].lower()}={limit(cur)}/{limit(hard)}" for res, cur, hard in section["rlimits"]]
    return [f"task: {section['comm']!r} ({section['cmdline']}), cwd {section['cwd']}, umask {section['umask']:03o}, "
            f"personality {section['personality']:#x}",
            f"  rlimits {' '.join(changed)}"]
