"""Credentials: real, effective, saved and filesystem uids and gids, supplementary groups, and
the dumpable flag (which a change of ids clears, and which decides who may read /proc/PID).

Restored last by the restorer: once it has become an unprivileged user it could do no other step.
"""
from umig import procfs

SYS_PRCTL, PR_GET_DUMPABLE = 157, 3


def dump(frozen):
    status = procfs.status(frozen.pid)
    return {"uids": [int(x) for x in status["Uid"].split()],
            "gids": [int(x) for x in status["Gid"].split()],
            "groups": [int(x) for x in status["Groups"].split()],
            "dumpable": frozen.syscall_checked("prctl(PR_GET_DUMPABLE)", SYS_PRCTL, PR_GET_DUMPABLE) == 1}


def restore(restorer, section):
    restorer.creds(section["uids"], section["gids"], section["groups"], dumpable=section["dumpable"])


def describe(section):
    return [f"credentials: uids {'/'.join(map(str, section['uids']))} gids {'/'.join(map(str, section['gids']))}"
            f" groups {','.join(map(str, section['groups'])) or 'none'}"]
