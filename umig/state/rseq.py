"""Restartable sequences: glibc registers an rseq area per thread, which the kernel updates on
every preemption. Re-registered at the same address with the same signature; a process that had
none gets none."""
import struct

_RSEQ_CS_POINTER = slice(8, 16)           # struct rseq: cpu_id_start, cpu_id, rseq_cs, ...
_RSEQ_CS = struct.Struct("<IIQQQ")        # version, flags, start_ip, post_commit_offset, abort_ip


def dump(frozen):
    config = frozen.tracee.rseq_configuration()
    if config is None:
        return None
    section = {"address": config.rseq_abi_pointer, "length": config.rseq_abi_size,
               "flags": config.flags, "signature": config.signature}
    # Frozen inside a critical section: the kernel would have sent it to the abort handler on its
    # next return to user space, so that is where it resumes, here or on the target.
    rseq_cs = int.from_bytes(frozen.read(section["address"], 32)[_RSEQ_CS_POINTER], "little")
    if rseq_cs:
        _, _, start_ip, post_commit_offset, abort_ip = _RSEQ_CS.unpack(frozen.read(rseq_cs, _RSEQ_CS.size))
        if start_ip <= frozen.registers.rip < start_ip + post_commit_offset:
            frozen.registers.rip = abort_ip
    return section


def restore(restorer, section):
    if section is not None:
        restorer.rseq(section["address"], section["length"], 0, section["signature"])


def describe(section):
    if section is None:
        return ["rseq: none"]
    return [f"rseq: area {section['address']:#x} ({section['length']} bytes), signature {section['signature']:#x}"]
