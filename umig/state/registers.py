"""Registers: the general-purpose set (user_regs_struct, with fs_base and gs_base) and the whole
xsave area (NT_X86_XSTATE) with the feature mask it was saved under.

The raw bytes are the truth in the image. On restore the agent installs them through ptrace at the
restorer's last syscall; a process frozen inside a blocking syscall resumes as the kernel would
after a signal that has no handler: restarted, or -EINTR for restart-block syscalls (nanosleep),
whose restart state stayed in the source kernel.
"""
from ptrace.syscall.names import SYSCALL_NAMES

from umig.errors import UmigError
from umig.ptrace import Registers

# struct _fpx_sw_bytes sits in the software-reserved bytes of the legacy FXSAVE area; the XSAVE
# header's XSTATE_BV follows the legacy area and says which components hold state.
_SW_XFEATURES = slice(472, 480)
_XSTATE_BV = slice(512, 520)
XFEATURE_NAMES = ["x87", "sse", "avx", "mpx bndregs", "mpx bndcsr", "avx-512 opmask", "avx-512 zmm_hi256",
                  "avx-512 hi16_zmm", "pt", "pkru", "pasid", "cet user", "cet supervisor", "hdc", "uintr",
                  "lbr", "hwp", "amx tilecfg", "amx tiledata", "apx"]


def xfeatures(xstate):
    """(enabled feature mask of the CPU and kernel, features holding state)."""
    return (int.from_bytes(xstate[_SW_XFEATURES], "little"), int.from_bytes(xstate[_XSTATE_BV], "little"))


def feature_names(mask):
    return ", ".join(XFEATURE_NAMES[i] if i < len(XFEATURE_NAMES) else f"feature {i}"
                     for i in range(64) if mask & (1 << i))


def dump(frozen):
    enabled, in_use = xfeatures(frozen.xstate)
    return {"gpr": frozen.registers.to_bytes(), "xstate": frozen.xstate,
            "xfeatures": enabled, "xstate_bv": in_use}


def check_target(section, target_xstate):
    """Refuse a target CPU that lacks a feature of the process's state (or whose xsave area differs)."""
    target_enabled, _ = xfeatures(target_xstate)
    missing = section["xfeatures"] & ~target_enabled
    if missing:
        raise UmigError(f"the target CPU lacks xsave features the process uses: {feature_names(missing)}")
    if len(target_xstate) != len(section["xstate"]):
        raise UmigError(f"the target's xsave area is {len(target_xstate)} bytes, the image's "
                        f"{len(section['xstate'])}: another CPU model")


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
