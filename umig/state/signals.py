"""Signals: every handler with its flags, restorer and mask; the blocked mask; pending signals of
the thread and of the process; the alternate signal stack.

/proc only shows which signals are caught, not how: handlers and the alternate stack are read by
running rt_sigaction and sigaltstack inside the frozen process. The blocked mask is installed by
the agent through ptrace at the very end, so that no pending signal reaches the restorer's code.
"""
import signal
import struct

from umig import procfs
from umig.ptrace import NR_RT_SIGACTION, SIGSET_SIZE, Buffer, KernelSigaction

SYS_SIGALTSTACK = 131
SIGKILL, SIGSTOP = 9, 19
SS_ONSTACK, SS_DISABLE = 1, 2
_STACK = struct.Struct("<QiiQ")          # ss_sp, ss_flags, padding, ss_size
SIG_DFL, SIG_IGN = 0, 1


def signal_name(signo):
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIGRTMIN+{signo - signal.SIGRTMIN}" if signo >= signal.SIGRTMIN else f"signal {signo}"


def describe_end(ended):
    """("signal", n) or ("status", n), as a process's end reads in a log."""
    kind, n = ended
    return f"killed by {signal_name(n)}" if kind == "signal" else f"exited with status {n}"


def mask_names(mask):
    return ",".join(signal_name(s) for s in range(1, 65) if mask & (1 << (s - 1))) or "none"


def dump(frozen):
    """Asks the frozen process (dump.Frozen.ask); returns what makes the section once it answered."""
    # Ask only of signals that /proc says are caught or ignored (a default action's flags mean
    # nothing), and of SIGCHLD, whose SA_NOCLDSTOP/SA_NOCLDWAIT matter even at its default.
    status = frozen.status
    not_default = int(status["SigCgt"], 16) | int(status["SigIgn"], 16) | 1 << (signal.SIGCHLD - 1)
    actions = {}
    for signo in range(1, 65):
        if signo not in (SIGKILL, SIGSTOP) and not_default & 1 << (signo - 1):
            actions[signo] = Buffer(KernelSigaction.SIZE)
            frozen.ask(f"rt_sigaction({signal_name(signo)})", NR_RT_SIGACTION, signo, 0, actions[signo], SIGSET_SIZE)
    altstack = Buffer(_STACK.size)
    frozen.ask("sigaltstack", SYS_SIGALTSTACK, 0, altstack)
    pending = [{"shared": shared, "signo": int.from_bytes(info[:4], "little"), "info": info}
               for shared in (False, True) for info in frozen.tracee.pending_signals(shared=shared)]

    def answered():
        kept = [[signo, *KernelSigaction.from_bytes(action.data)] for signo, action in actions.items()]
        sp, flags, _, size = _STACK.unpack(altstack.data)
        return {"actions": [action for action in kept if action[1] != SIG_DFL or action[2] or action[4]],
                "blocked": frozen.blocked, "pending": pending, "altstack": {"sp": sp, "flags": flags, "size": size}}
    return answered


def restore(restorer, section):
    # The restorer has no handlers (exec resets them) but inherited its starter's ignored
    # signals: those go back to the default unless the image has them. One step per signal
    # would be sixty in the final freeze.
    actions = {action[0]: action[1:] for action in section["actions"]}
    inherited = int(procfs.status(restorer.pid)["SigIgn"], 16)
    for signo in range(1, 65):
        if signo not in (SIGKILL, SIGSTOP) and (signo in actions or inherited & 1 << (signo - 1)):
            restorer.sigaction(signo, *actions.get(signo, (SIG_DFL, 0, 0, 0)))
    altstack = section["altstack"]
    if not altstack["flags"] & SS_DISABLE:
        # SS_ONSTACK only says the process was running on it; it is not a flag one can set.
        restorer.sigaltstack(altstack["sp"], altstack["flags"] & ~SS_ONSTACK, altstack["size"])
    for entry in section["pending"]:
        restorer.sigqueue(entry["signo"], entry["shared"], entry["info"])


def describe(section):
    lines = [f"signals: blocked {mask_names(section['blocked'])}; "
             f"pending {', '.join(signal_name(p['signo']) + (' (process)' if p['shared'] else '') for p in section['pending']) or 'none'}"]
    for signo, handler, flags, sa_restorer, mask in section["actions"]:
        what = {SIG_DFL: "default", SIG_IGN: "ignored"}.get(handler, f"handler {handler:#x}")
        lines.append(f"  {signal_name(signo):<10} {what} flags {flags:#x} mask {mask_names(mask)}")
    altstack = section["altstack"]
    if not altstack["flags"] & SS_DISABLE:
        lines.append(f"  alternate stack {altstack['sp']:#x} size {altstack['size']}")
    return lines
