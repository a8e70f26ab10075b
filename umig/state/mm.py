"""The mm fields: where code, data, brk, stack, arguments and environment live, the auxiliary
vector and the executable; given back to the kernel with prctl(PR_SET_MM, PR_SET_MM_MAP).

The kernel names [heap] and [stack] in /proc/PID/maps from these fields, and /proc/PID/cmdline,
/proc/PID/environ and /proc/PID/exe read through them.
"""
import os

from umig import procfs
from umig.state.memory import check_identity, file_identity

SYS_BRK = 12


def dump(frozen):
    """Asks the frozen process (dump.Frozen.ask); returns what makes the section once it answered."""
    pid = frozen.pid
    fields = procfs.mm_layout(pid)
    # The current break is in no /proc file; brk(0) run inside the process returns it.
    brk = frozen.ask("brk", SYS_BRK, 0)
    exe = os.readlink(procfs.proc_path(pid, "exe"))
    return lambda: {"fields": dict(fields, brk=brk.result), "auxv": procfs.read_bytes(pid, "auxv"), "exe": exe,
                    "exe_identity": file_identity(exe)}


def check_target(section):
    check_identity(section["exe"], section["exe_identity"], "executable")


def restore(restorer, section):
    restorer.mm(section["fields"], section["auxv"], section["exe"])


def describe(section):
    f = section["fields"]
    return [f"mm: exe {section['exe']}; code {f['start_code']:#x}-{f['end_code']:#x}, "
            f"data {f['start_data']:#x}-{f['end_data']:#x}, brk {f['start_brk']:#x}-{f['brk']:#x}, "
            f"stack {f['start_stack']:#x}, auxv {len(section['auxv'])} bytes"]
