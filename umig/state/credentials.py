"""Credentials: real, effective, saved and filesystem uids and gids, supplementary groups, and
the dumpable flag (which a change of ids clears, and which decides who may read /proc/PID).

Restored last by the restorer: once it has become an unprivileged user it could do no other step.
"""
from umig import procfs

SYS_PRCTL, PR_GET_DUMPABLE = 157, 3


def check(pid):
    """Capabilities, no_new_privs and seccomp are not restored yet: refuse a process whose sets are
    not what its uids alone give (after setresuid, the kernel derives them the same way here)."""
    status = procfs.status(pid)
    caps = {name: int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    uids = [int(x) for x in status["Uid"].split()]
    ours = int(procfs.status("self")["CapBnd"], 16)
    permitted = caps["CapBnd"] if 0 in uids[:3] else 0
    expected = {"CapInh": 0, "CapAmb": 0, "CapBnd": ours, "CapPrm": permitted,
                "CapEff": permitted if uids[1] == 0 else 0}
    blockers = [f"pid {pid}'s {name} is {caps[name]:#x}, not {value:#x}: capability sets other than the "
                f"defaults of its uids do not move yet" for name, value in expected.items() if caps[name] != value]
    if status.get("NoNewPrivs", "0") != "0":
        blockers.append(f"pid {pid} has no_new_privs set, which does not move yet")
    if status.get("Seccomp", "0") != "0":
        blockers.append(f"pid {pid} runs under seccomp (mode {status['Seccomp']}), which does not move yet")
    return blockers


def dump(frozen):
    """Asks the frozen process (dump.Frozen.ask); returns what makes the section once it answered."""
    status = frozen.status
    dumpable = frozen.ask("prctl(PR_GET_DUMPABLE)", SYS_PRCTL, PR_GET_DUMPABLE)
    return lambda: {"uids": [int(x) for x in status["Uid"].split()],
                    "gids": [int(x) for x in status["Gid"].split()],
                    "groups": [int(x) for x in status["Groups"].split()],
                    "dumpable": dumpable.result == 1}


def restore(restorer, section):
    restorer.creds(section["uids"], section["gids"], section["groups"], dumpable=section["dumpable"])


def describe(section):
    return [f"credentials: uids {'/'.join(map(str, section['uids']))} gids {'/'.join(map(str, section['gids']))}"
            f" groups {','.join(map(str, section['groups'])) or 'none'}"]
