"""Registers: the general-purpose set (user_regs_struct, with fs_base and gs_base) and the whole
xsave area (NT_X86_XSTATE) with the feature mask it was saved under.

The raw bytes are the truth in the image. On restore the agent installs them through ptrace at the
restorer's last syscall; a process frozen inside a blocking syscall resumes as the kernel would
after a signal that has no handler (restarted, or -EINTR for restart-block syscalls such as
nanosleep, whose restart state stayed in the source kernel), or, when a signal it had pending
is delivered as it resumes, as the kernel decides then (ptrace.restart_registers).
"""
from ptrace.syscall.names import SYSCALL_NAMES

from umig.errors import UmigError
from umig.ptrace import Registers, xstate_features

# The XSAVE header's XSTATE_BV follows the legacy area and says which components hold state.
_XSTATE_BV = slice(512, 520)
XFEATURE_NAMES = ["x87", "sse", "avx", "mpx bndregs", "mpx bndcsr", "avx-512 opmask", "avx-512 zmm_hi256",
                  "avx-512 hi16_zmm", "pt", "pkru", "pasid", "cet user", "cet supervisor", "hdc", "uintr",
                  "lbr", "hwp", "amx tilecfg", "amx tiledata", "apx"]


def feature_names(mask):
    return ", ".join(XFEATURE_NAMES[i] if i < len(XFEATURE_NAMES) else f"feature {i}"
                     for i in range(64) if mask & (1 << i))


def dump(frozen):
    return {"gpr": frozen.registers.to_bytes(), "xstate": frozen.xstate,
            "xfeatures": xstate_features(frozen.xstate),
            "xstate_bv": int.from_bytes(frozen.xstate[_XSTATE_BV], "little")}


def check_target(section, target_xstate):
    """Refuse a target CPU that lacks an xsave feature the source offered: besides the state
    saved in it, the process chose its code paths (glibc's ifuncs) by those features."""
    missing = section["xfeatures"] & ~xstate_features(target_xstate)
    if missing:
        raise UmigError(f"the target CPU lacks xsave features the process may use: {feature_names(missing)}")


def describe(section):
    regs = Registers.from_bytes(section["gpr"])
    lines = [f"registers: xsave {len(section['xstate'])} bytes, state in {feature_names(section['xstate_bv'])}"]
    names = [name for name in Registers.FIELDS if name not in ("cs", "ss", "ds", "es", "fs", "gs")]
    for row in range(0, len(names), 4):
        lines.append("  " + "  ".join(f"{name:>8} {getattr(regs, name):016x}" for name in names[row:row + 4]))
    if regs.orig_rax < 2 ** 63 and regs.rax >= 2 ** 64 - 4096:
        name = SYSCALL_NAMES.get(regs.orig_rax, str(regs.orig_rax))
        lines.append(f"  stopped inside {name}() (returning {regs.rax - 2 ** 64}): resumes as after a signal")
    return lines
