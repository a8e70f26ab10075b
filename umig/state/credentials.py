"""Credentials: real, effective, saved and filesystem uids and gids, and supplementary groups.

Restored last by the restorer: once it has become an unprivileged user it could do no other step.
"""
from umig import procfs


def dump(pid):
    status = procfs.status(pid)
    return {"uids": [int(x) for x in status["Uid"].split()],
            "gids": [int(x) for x in status["Gid"].split()],
            "groups": [int(x) for x in status["Groups"].split()]}


def restore(restorer, section):
    restorer.creds(section["uids"], section["gids"], section["groups"])


def describe(section):
    return [f"credentials: uids {'/'.join(map(str, section['uids']))} gids {'/'.join(map(str, section['gids']))}"
            f" groups {','.join(map(str, section['groups'])) or 'none'}"]
