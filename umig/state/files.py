"""File descriptors: regular files (path, flags, offset, identity) and character devices by path.

Everything else a descriptor can be (pipes, sockets, terminals, eventfd, epoll, ...) is refused
before the process is frozen, naming the fd and its kind.
"""
import ctypes
import os
import stat

from umig import procfs
from umig.errors import Refused, UmigError
from umig.state.memory import check_identity, file_identity

# Character devices that carry no state of their own, so opening the same path again is the same fd.
STATELESS_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
O_ACCMODE, O_CLOEXEC = 0o3, 0o2000000
SYS_KCMP, KCMP_FILE = 312, 0
_libc = ctypes.CDLL(None, use_errno=True)


def _same_open_file(pid, fd1, fd2):
    """kcmp(2): do two descriptors of pid refer to one open file (dup, or inherited)?"""
    result = _libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, fd1, fd2)
    if result < 0:
        raise UmigError(f"kcmp of fds {fd1} and {fd2} of pid {pid} failed: {os.strerror(ctypes.get_errno())}")
    return result == 0


def _kind(pid, fd):
    """(kind, path, stat) of an fd; kind is 'file' or 'chardev', else raises Refused."""
    link = os.readlink(procfs.proc_path(pid, "fd", str(fd)))
    try:
        st = os.stat(procfs.proc_path(pid, "fd", str(fd)))
    except OSError as e:
        raise Refused(f"fd {fd}: {link}: {e.strerror}") from None
    if link.startswith("anon_inode:"):
        raise Refused(f"fd {fd}: {link[len('anon_inode:'):].strip('[]')} is not supported")
    if stat.S_ISFIFO(st.st_mode):
        raise Refused(f"fd {fd}: pipe ({link}) is not supported yet")
    if stat.S_ISSOCK(st.st_mode):
        raise Refused(f"fd {fd}: socket ({link}) is not supported")
    if stat.S_ISCHR(st.st_mode):
        if link in STATELESS_DEVICES:
            return "chardev", link, st
        what = "terminal" if link.startswith(("/dev/pts/", "/dev/tty")) or link == "/dev/console" else "device"
        raise Refused(f"fd {fd}: {what} {link} is not supported")
    if stat.S_ISDIR(st.st_mode):
        raise Refused(f"fd {fd}: directory {link} is not supported")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"fd {fd}: {link} is not a regular file")
    if link.endswith(" (deleted)"):
        raise Refused(f"fd {fd}: file {link[:-10]} was deleted")
    if not procfs.same_file(procfs.proc_path(pid, "fd", str(fd)), link):
        raise Refused(f"fd {fd}: {link} is another file where umig looks (the process has its own mount namespace)")
    return "file", link, st


def check(pid):
    blockers = []
    for fd in procfs.fd_numbers(pid):
        try:
            _kind(pid, fd)
        except Refused as e:
            blockers.append(str(e))
        except FileNotFoundError:
            pass  # closed while we looked
    return blockers


def dump(pid, hidden=()):
    fds = []
    for fd in procfs.fd_numbers(pid):
        if fd in hidden:
            continue
        kind, path, st = _kind(pid, fd)
        info = procfs.fdinfo(pid, fd)
        entry = {"fd": fd, "kind": kind, "path": path, "flags": int(info["flags"], 8),
                 "offset": int(info["pos"])}
        # A duplicate shares its original's offset and flags: restored with dup3, not opened anew.
        original = next((other["fd"] for other in fds if other["path"] == path and "dup_of" not in other
                         and _same_open_file(pid, other["fd"], fd)), None)
        if original is not None:
            entry["dup_of"] = original
        elif kind == "file":
            # Content hashes of data files would cost a read of every byte: size and mtime tell
            # whether the file moved on while the process was away.
            entry["identity"] = file_identity(path, content=False)
        fds.append(entry)
    return {"fds": fds}


def check_target(section, settled=True):
    """Refuse descriptors of files this host lacks or has otherwise; `settled`: see
    memory.check_identity."""
    for entry in section["fds"]:
        if "dup_of" in entry:
            continue
        if entry["kind"] == "file":
            check_identity(entry["path"], entry["identity"], f"fd {entry['fd']}: file", settled)
        elif not os.path.exists(entry["path"]):
            raise UmigError(f"fd {entry['fd']}: device {entry['path']} is missing on the target")


def lowest_free_fd(section):
    """The first descriptor number above every fd of the image: where the restorer parks its channel."""
    return max([2] + [entry["fd"] for entry in section["fds"]]) + 1


def restore(restorer, section):
    for entry in section["fds"]:
        if "dup_of" in entry:
            restorer.dup(entry["dup_of"], entry["fd"], bool(entry["flags"] & O_CLOEXEC))
        else:
            restorer.open_fd(entry["fd"], entry["flags"], entry["offset"], entry["kind"] == "file", entry["path"])


def describe(section):
    lines = [f"files: {len(section['fds'])} descriptors"]
    for entry in section["fds"]:
        mode = {0: "r", 1: "w", 2: "rw"}.get(entry["flags"] & O_ACCMODE, "?")
        extra = f" offset {entry['offset']}" if entry["kind"] == "file" else ""
        extra += f" (same open file as fd {entry['dup_of']})" if "dup_of" in entry else ""
        lines.append(f"  fd {entry['fd']:>3} {mode:<2} {entry['kind']:<7} {entry['path']}{extra}"
                     f"{' cloexec' if entry['flags'] & O_CLOEXEC else ''}")
    return lines
