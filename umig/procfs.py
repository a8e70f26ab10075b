"""Reading a process's state out of /proc, the way the kernel documents it (proc(5))."""
import os
import re
from typing import NamedTuple

from umig.errors import UmigError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# /proc/PID/stat fields (1-based in proc(5)) that describe the memory layout: PR_SET_MM_MAP wants them back.
_STAT_MM_FIELDS = {
    "start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
    "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51,
}
PF_KTHREAD = 0x00200000


class MapsEntry(NamedTuple):
    """One line of /proc/PID/maps."""
    start: int
    end: int
    perms: str      # e.g. "r-xp"
    offset: int
    device: str
    inode: int
    path: str       # "" for anonymous, "[heap]", a file path, "/path (deleted)", ...

    @property
    def size(self):
        return self.end - self.start

    @property
    def shared(self):
        return self.perms[3] == "s"

    def line(self):
        """The line as the kernel prints it, minus device and inode (they differ between hosts)."""
        return f"{self.start:x}-{self.end:x} {self.perms} {self.offset:08x} {self.path}".rstrip()


_MAPS_LINE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)")


def proc_path(pid, *parts):
    return os.path.join("/proc", str(pid), *parts)


def read_text(pid, name):
    try:
        with open(proc_path(pid, name)) as f:
            return f.read()
    except FileNotFoundError:
        raise UmigError(f"no process with pid {pid}") from None
    except ProcessLookupError:
        raise UmigError(f"process {pid} exited") from None


def read_bytes(pid, name):
    try:
        with open(proc_path(pid, name), "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise UmigError(f"no process with pid {pid}") from None


def _maps_entry(line):
    m = _MAPS_LINE.fullmatch(line)
    if not m:
        raise UmigError(f"cannot parse a /proc/PID/maps line: {line!r}")
    start, end, perms, offset, device, inode, path = m.groups()
    return MapsEntry(int(start, 16), int(end, 16), perms, int(offset, 16), device, int(inode), path)


def maps(pid):
    return [_maps_entry(line) for line in read_text(pid, "maps").splitlines()]


def smaps(pid):
    """Each mapping's VmFlags mnemonics (/proc/PID/smaps), by its start address."""
    return parse_smaps(read_text(pid, "smaps"))[1]


def parse_smaps(text):
    """The maps() entries of an smaps text read before (each block begins with the mapping's
    maps line), and smaps() of it."""
    # Each mapping's block ends with its VmFlags line: splitting there costs a quarter of a
    # regular expression over every line (0.07 against 0.28 ms for some sixty mappings, more
    # inside a freeze). A newline in a path reads as \012 there: "\nVmFlags:" begins a field.
    blocks = text.split("\nVmFlags:")
    entries, vmflags = [], {}
    head = blocks[0]
    for block in blocks[1:]:
        entries.append(_maps_entry(head[:head.index("\n")]))
        flags, _, head = block.partition("\n")
        vmflags[entries[-1].start] = flags.split()
    return entries, vmflags


def status(pid):
    """/proc/PID/status as a dict of field name -> raw value string."""
    fields = {}
    for line in read_text(pid, "status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def stat_fields(pid):
    """/proc/PID/stat split into fields, numbered from 1 as in proc(5) (index 0 is unused)."""
    text = read_text(pid, "stat")
    # comm may hold spaces and parentheses: it ends at the last ')'.
    head, _, rest = text.rpartition(")")
    pid_field, _, comm = head.partition(" (")
    return [None, pid_field, comm] + rest.split()


def mm_layout(pid):
    fields = stat_fields(pid)
    return {name: int(fields[index]) for name, index in _STAT_MM_FIELDS.items()}


def is_kernel_thread(pid):
    return int(stat_fields(pid)[9]) & PF_KTHREAD != 0


def namespace_pid(status):
    """The PID a process has in its own (innermost) PID namespace, what getpid() returns to it,
    from its status()."""
    return int(status["NSpid"].split()[-1])


def same_file(link, path):
    """Whether a /proc link (fd, map_files, exe, cwd) of a process and a path as umig sees it name
    one file: not so when the process lives in another mount namespace."""
    try:
        a, b = os.stat(link), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def children(pid):
    try:
        text = read_text(pid, f"task/{pid}/children")
    except UmigError:
        return []
    return [int(p) for p in text.split()]


def traced_by(tracer):
    """The processes `tracer` (a thread id) traces now."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if status(entry).get("TracerPid") == str(tracer):
                    found.append(int(entry))
            except (UmigError, OSError):
                pass  # gone meanwhile
    return found


def fd_numbers(pid):
    try:
        return sorted(int(fd) for fd in os.listdir(proc_path(pid, "fd")))
    except FileNotFoundError:
        raise UmigError(f"no process with pid {pid}") from None


def fdinfo(pid, fd):
    fields = {}
    for line in read_text(pid, f"fdinfo/{fd}").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields

