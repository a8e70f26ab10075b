"""The freestanding restorer and its Python client, on real processes (run as root)."""

import ctypes
import errno
import mmap
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from umig import procfs  # noqa: E402
from umig.errors import UmigError  # noqa: E402
from umig.restorer import (LAYOUTS, MAX_PAYLOAD, PROTOCOL_VERSION, RELOCATE_STACK, Op,  # noqa: E402
                           RestoreStepError, Restorer)
from umig.state import memory  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the restorer needs root")

# Addresses the restorer's own layout never uses, for the test image.
HOLE = 0x200000000
DATA = 0x300000000
CODE = 0x310000000
VDSO_TO = 0x400000000
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
EXIT_42 = bytes.fromhex("b83c000000" "bf2a000000" "0f05")  # mov $60,%eax; mov $42,%edi; syscall
SPECIAL = ("[vvar", "[vdso", "[vsyscall")  # the vDSO set, and what can never be unmapped


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("restorer") / "umig-restorer"
    subprocess.run(["make", "-s", "-C", str(ROOT / "restorer"), f"OUTPUT={out}"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


@pytest.fixture
def restorers(binary):
    """Makes restorers and kills whatever a test leaves of them."""
    made = []

    def make():
        r = Restorer(binary, timeout=10)
        made.append(r)
        return r

    yield make
    for r in made:
        r.kill()


def our_children():
    pid = os.getpid()
    return {int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}


def assert_nothing_left(r, children_before):
    for pid in {r.pid, r.init_pid, r.launcher_child_pid} - {None}:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
    assert our_children() <= children_before


def status_field(pid, name):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].split()
    raise KeyError(name)


def mappings(pid):
    """(start, end, perms, name) for each line of /proc/PID/maps."""
    result = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        result.append((start, end, fields[1], fields[5] if len(fields) > 5 else ""))
    return result


def read_memory(pid, address, length):
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(length)


def write_memory(pid, address, data):
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        mem.write(data)


def free_pid():
    """A PID unlikely to be taken: free, and far above the ones in use."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    used = {int(name) for name in os.listdir("/proc") if name.isdigit()}
    low = min(max(used) + 1000, pid_max - 2000)
    while True:
        pid = random.randrange(low, pid_max)
        if pid not in used:
            return pid


def relocate_and_clean(r, spare=0):
    """RELOCATE into HOLE, then unmap everything of the restorer's but the vDSO set."""
    r.relocate(HOLE, r.hole_size + spare)
    r.sync()
    for start, end, _, name in mappings(r.pid):
        if start != HOLE and not name.startswith(SPECIAL):
            r.unmap(start, end - start)


# Minimal ptrace, standing in for the agent's hand-off.
PTRACE_SYSCALL, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 24, 12, 13, 17
PTRACE_SEIZE = 0x4206
WALL = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp "
        "ss fs_base gs_base ds es fs gs").split()]


def ptrace(request, pid, addr=None, data=None):
    if _libc.ptrace(request, pid, addr, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request}): {os.strerror(err)}")


def wait_stop(pid):
    _, status = os.waitpid(pid, WALL)
    assert os.WIFSTOPPED(status), f"expected a stop, got wait status {status:#x}"
    return os.WSTOPSIG(status)


def get_regs(pid):
    regs = Regs()
    ptrace(PTRACE_GETREGS, pid, None, ctypes.addressof(regs))
    return regs


# ---- the build and the contract ------------------------------------------------------------

def test_binary_has_no_relocations(binary):
    out = subprocess.run(["readelf", "-rlW", str(binary)], check=True, capture_output=True,
                         text=True).stdout
    assert "There are no relocations in this file" in out
    assert "INTERP" not in out


def test_build_rejects_a_relocation(tmp_path):
    for name in ("restorer.c", "protocol.h", "Makefile"):
        shutil.copy(ROOT / "restorer" / name, tmp_path)
    with open(tmp_path / "restorer.c", "a") as source:
        source.write("\nvoid *const self_pointer = (void *)&self_pointer;\n")
    out = tmp_path / "out" / "umig-restorer"
    build = subprocess.run(["make", "-s", "-C", str(tmp_path), f"OUTPUT={out}"],
                           capture_output=True, text=True)
    assert build.returncode != 0
    assert "relocations" in build.stderr
    assert not out.exists()


def test_python_matches_protocol_header(tmp_path):
    header = (ROOT / "restorer" / "protocol.h").read_text()
    ops = {name: int(value) for name, value in re.findall(r"UMIG_OP_(\w+)\s*=\s*(\d+)", header)}
    assert ops == {op.name: op.value for op in Op}

    probe = tmp_path / "probe.c"
    probe.write_text('#include <stdio.h>\n#include "protocol.h"\nint main(void) {\n'
                     + "".join(f'printf("{name} %zu\\n", sizeof(struct {name}));\n'
                               for name in LAYOUTS)
                     + 'printf("max %d stack %d version %d\\n", UMIG_MAX_PAYLOAD, '
                       'UMIG_RELOCATE_STACK, UMIG_PROTOCOL_VERSION);\nreturn 0;\n}\n')
    subprocess.run(["gcc", "-I", str(ROOT / "restorer"), "-o", str(tmp_path / "probe"),
                    str(probe)], check=True)
    lines = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    sizes = dict(line.split() for line in lines[:-1])
    assert {name: int(size) for name, size in sizes.items()} == \
        {name: layout.size for name, layout in LAYOUTS.items()}
    assert lines[-1] == f"max {MAX_PAYLOAD} stack {RELOCATE_STACK} version {PROTOCOL_VERSION}"


# ---- start-up -----------------------------------------------------------------------------------

def assert_ready_child(r):
    assert r.image_size > 0 and r.hole_size > r.image_size
    # every signal blocked but the two that cannot be
    assert int(status_field(r.pid, "SigBlk")[0], 16) == \
        ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1))) & (2**64 - 1)
    assert any(name.endswith("umig-restorer") for *_, name in mappings(r.pid))


def test_start_any(restorers):
    before = our_children()
    r = restorers()
    r.start("any")
    assert r.pid == r.launcher_child_pid and r.init_pid is None
    assert status_field(r.pid, "PPid") == [str(os.getpid())]
    assert_ready_child(r)
    r.kill()
    assert_nothing_left(r, before)


def test_start_keep_takes_the_pid(restorers):
    before = our_children()
    pid = free_pid()
    r = restorers()
    r.start("keep", pid)
    assert r.pid == r.launcher_child_pid == pid and r.init_pid is None
    assert status_field(pid, "PPid") == [str(os.getpid())]
    assert_ready_child(r)
    r.kill()
    assert_nothing_left(r, before)


def test_start_ns_uses_the_pid_inside_a_new_namespace(restorers):
    before = our_children()
    r = restorers()
    r.start("ns", 4242)
    assert r.init_pid == r.launcher_child_pid and r.pid != r.init_pid
    assert status_field(r.init_pid, "NSpid") == [str(r.init_pid), "1"]
    assert status_field(r.pid, "NSpid") == [str(r.pid), "4242"]
    assert status_field(r.pid, "PPid") == [str(r.init_pid)]
    assert status_field(r.init_pid, "PPid") == [str(os.getpid())]
    assert_ready_child(r)
    r.kill()
    assert_nothing_left(r, before)


def test_start_keep_fails_on_a_taken_pid(restorers):
    before = our_children()
    r = restorers()
    with pytest.raises(RestoreStepError) as failure:
        r.start("keep", os.getpid())
    message = str(failure.value)
    assert "clone3" in message and str(os.getpid()) in message and "File exists" in message
    assert failure.value.step == "clone" and failure.value.errno == errno.EEXIST
    assert_nothing_left(r, before)


def test_start_ns_reports_the_init_clone_failure(restorers):
    before = our_children()
    r = restorers()
    with pytest.raises(RestoreStepError,
                       match=r"clone3 could not create PID 1 .*mode ns.*File exists"):
        r.start("ns", 1)  # the init holds PID 1 of its namespace
    assert r.init_pid is not None
    assert_nothing_left(r, before)


def test_ns_init_exits_like_its_child(restorers):
    r = restorers()
    r.start("ns", 77)
    os.kill(r.pid, signal.SIGKILL)
    assert r.wait() == 128 + signal.SIGKILL


def test_missing_binary_is_reported(tmp_path):
    with pytest.raises(Exception, match="restorer binary not built: run make"):
        Restorer(tmp_path / "nowhere").start("any")


# ---- a whole mini restore -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["any", "ns"])
def test_end_to_end(restorers, mode):
    """Relocate, clear the restorer out, build a tiny image, then hand it over with ptrace."""
    before = our_children()
    r = restorers()
    r.start(mode, 4343 if mode == "ns" else 0)
    pid = r.pid
    ptrace(PTRACE_SEIZE, pid, None, None)

    vdso_set = [(s, e, n) for s, e, _, n in mappings(pid) if n.startswith(("[vvar", "[vdso"))]
    base, vdso_size = vdso_set[0][0], vdso_set[-1][1] - vdso_set[0][0]
    relocate_and_clean(r, spare=vdso_size)
    # Through a parking place in the hole's spare tail, which the restorer leaves alone; moved
    # together, keeping their distances: the vDSO finds its data by offset.
    parking = HOLE + r.hole_size
    for start, end, _ in vdso_set:
        r.move(start, parking + start - base, end - start)
    for start, end, _ in vdso_set:
        r.move(parking + start - base, VDSO_TO + start - base, end - start)
    cmdline = b"restored\0--flag\0"
    pattern = (cmdline + bytes(range(256)) * 32)[:8192]
    r.map(DATA, len(pattern), prot=PROT_RW)
    r.map(CODE, mmap.PAGESIZE, prot=PROT_RW)
    r.sync()
    write_memory(pid, DATA, pattern)
    write_memory(pid, CODE, EXIT_42)
    r.protect(DATA, len(pattern), mmap.PROT_READ)
    r.protect(CODE, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC)
    r.mm(start_code=CODE, end_code=CODE + 4096, start_data=DATA, end_data=DATA + 4096,
         start_brk=DATA + 8192, brk=DATA + 8192, start_stack=DATA + 8000,
         arg_start=DATA, arg_end=DATA + len(cmdline), env_start=DATA + 32, env_end=DATA + 64,
         auxv=struct.pack("<4Q", 6, 4096, 0, 0), exe="/bin/true")
    r.sync()

    maps = mappings(pid)
    assert [(s, e, p) for s, e, p, _ in maps if not _.startswith(SPECIAL)] == [
        (HOLE, HOLE + r.hole_size, "rwxp"),
        (DATA, DATA + len(pattern), "r--p"),
        (CODE, CODE + 4096, "r-xp")]
    assert [(s, e, n) for s, e, _, n in maps if n.startswith(("[vvar", "[vdso"))] == \
        [(VDSO_TO + s - base, VDSO_TO + e - base, n) for s, e, n in vdso_set]
    assert read_memory(pid, DATA, len(pattern)) == pattern
    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath("/bin/true")
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
    assert Path(f"/proc/{pid}/auxv").read_bytes()[:16] == struct.pack("<2Q", 6, 4096)

    r.finish()
    assert wait_stop(pid) == signal.SIGSTOP
    ptrace(PTRACE_SYSCALL, pid)  # and drop the SIGSTOP
    assert wait_stop(pid) == signal.SIGTRAP
    assert get_regs(pid).orig_rax == 11  # munmap, entering
    ptrace(PTRACE_SYSCALL, pid)
    assert wait_stop(pid) == signal.SIGTRAP
    regs = get_regs(pid)
    assert regs.orig_rax == 11 and regs.rax == 0
    assert [s for s, *_ in mappings(pid) if not _[-1].startswith(SPECIAL)] == [DATA, CODE]
    regs.rip = CODE
    ptrace(PTRACE_SETREGS, pid, None, ctypes.addressof(regs))
    ptrace(PTRACE_DETACH, pid)
    assert r.wait() == 42
    assert_nothing_left(r, before)


def test_mm_cannot_change_exe_while_the_restorer_image_is_mapped(restorers):
    r = restorers()
    r.start("any")
    r.map(DATA, 8192, prot=PROT_RW)
    r.mm(start_code=DATA, end_code=DATA + 4096, start_data=DATA, end_data=DATA,
         start_brk=DATA, brk=DATA, start_stack=DATA, arg_start=DATA, arg_end=DATA,
         env_start=DATA, env_end=DATA, exe="/bin/true")
    with pytest.raises(RestoreStepError, match="'mm' failed.*EBUSY.*unmapped"):
        r.sync()


def test_pipelined_steps(restorers):
    """Far more reports than a socket buffer holds, unread while sending: no deadlock (steps
    queued and sent together once hung here, both sides waiting on a full buffer: a stall fails
    the test instead of hanging it)."""
    r = restorers()
    r.start("any")

    def stalled(signo, frame):
        raise TimeoutError("the steps stalled")
    previous = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(20)
    try:
        for _ in range(20000):
            r.umask(0o22)
        r.map(DATA, 4096, prot=PROT_RW)
        r.sync()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert read_memory(r.pid, DATA, 4096) == bytes(4096)


def test_page_writer_fills_missing_present_and_unregistered_memory(restorers):
    """The agent's page writer: UFFDIO_COPY into registered memory that has no page yet, an
    ordinary write over pages already there and into memory outside the userfaultfd, in one run
    that crosses all three; the memory then reads back as written."""
    r = restorers()
    r.start("any")
    size = 8 << 20
    r.map(DATA, size, prot=PROT_RW)
    r.map(DATA + size, size, prot=PROT_RW)
    r.sync()
    write_memory(r.pid, DATA + (2 << 20), b"x" * 4096)  # a page already there, mid-run
    writer = memory.PageWriter(r, {"mappings": [{"kind": "anon", "start": DATA, "end": DATA + size,
                                                 "pages": size // 4096, "vmflags": []}]})
    try:
        bulk = os.urandom(4 << 20)
        writer.write([[DATA, len(bulk)]], bulk)                          # missing, then present
        writer.write([[DATA + size - (2 << 20), len(bulk)]], bulk)       # registered, then not
        with pytest.raises(UmigError, match=r"writing 4096 bytes at 0x310000000 into pid \d+ failed: Bad address"):
            writer.write([[CODE, 4096]], bulk[:4096])                   # nothing mapped there
    finally:
        writer.close()
    assert read_memory(r.pid, DATA, len(bulk)) == bulk
    assert read_memory(r.pid, DATA + size - (2 << 20), len(bulk)) == bulk
    r.umask(0o22)
    r.sync()  # the restorer is unharmed


def test_page_writer_sparse_mapping_vectored(restorers):
    """A mapping of which little travels is left out of the userfaultfd (unless a fault there may
    bring in a huge page), its scattered pages written many runs to a process_vm_writev: more
    runs than one call takes, in a batch of its own and in one that begins in registered memory
    and crosses into it; its holes stay zeros. A write that stops short at a page it cannot write
    goes on from there, and fails naming that page."""
    r = restorers()
    r.start("any")
    sparse, sparse_size = DATA + (1 << 30), 256 << 20
    dense, huge = sparse - (8 << 20), DATA + (2 << 30)
    r.map(dense, 8 << 20, prot=PROT_RW)
    r.map(sparse, sparse_size, prot=PROT_RW, flags=mmap.MAP_PRIVATE | memory.MAP_NORESERVE)
    r.map(huge, 64 << 20, prot=PROT_RW)
    r.madvise(huge, 64 << 20, memory.MADVISED["hg"])
    r.sync()
    starts = sorted(random.Random(7).sample(range(sparse + 4 * 4096, sparse + sparse_size, 4 * 4096), 2600))
    runs = [[start, 4096 * (3 if i % 50 == 0 else 1)] for i, start in enumerate(starts)]
    write_memory(r.pid, runs[7][0], b"x" * 4096)  # a page already there
    carried = 256 + 1 + sum(length for _, length in runs) // 4096
    assert carried * 4096 * memory.SPARSE_SHARE < sparse_size
    writer = memory.PageWriter(r, {"mappings": [
        {"kind": "anon", "start": dense, "end": sparse, "pages": 2048, "vmflags": []},
        {"kind": "anon", "start": sparse, "end": sparse + sparse_size, "pages": carried, "vmflags": ["nr"]},
        {"kind": "heap", "start": huge, "end": huge + (64 << 20), "pages": 1, "vmflags": ["hg"]}]})
    try:
        vmflags = procfs.smaps(r.pid)
        assert "um" in vmflags[dense] and "um" not in vmflags[sparse]
        takes_huge_pages = bool(memory._thp_modes() & {"always", "madvise"})
        assert ("um" in vmflags[huge]) == takes_huge_pages
        expected = bytearray(sparse_size)
        crossing = [sparse - (1 << 20), (1 << 20) + 4096]  # into the sparse mapping's first page
        for batch in (runs[:1500], [crossing] + runs[1500:]):
            payload = os.urandom(sum(length for _, length in batch))
            writer.write(batch, payload)
            offset = 0
            for start, length in batch:
                skip = max(sparse - start, 0)
                expected[start + skip - sparse:start + length - sparse] = payload[offset + skip:offset + length]
                offset += length
        assert read_memory(r.pid, dense + (7 << 20), 1 << 20) == payload[:1 << 20]
        here = read_memory(r.pid, sparse, sparse_size)
        wrong = [page for page in range(0, sparse_size, 4096) if here[page:page + 4096] != expected[page:page + 4096]]
        assert not wrong, f"{len(wrong)} pages differ, the first at {sparse + wrong[0]:#x}"

        singles = [[start, 4096] for start, _ in runs]
        r.unmap(singles[2000][0], 4096)
        r.sync()
        payload = os.urandom(4096 * len(singles))
        with pytest.raises(UmigError, match=rf"writing 4096 bytes at {singles[2000][0]:#x} into pid \d+ failed: "
                                            "Bad address"):
            writer.write(singles, payload)
        assert read_memory(r.pid, singles[1999][0], 4096) == payload[1999 * 4096:2000 * 4096]
    finally:
        writer.close()
    r.umask(0o22)
    r.sync()  # the restorer is unharmed


# ---- process state --------------------------------------------------------------------------

def signal_bit(signo):
    return 1 << (signo - 1)


def siginfo(signo, code=-1, value=0):  # SI_QUEUE from our pid and uid
    return struct.pack("<iii4xiiQ", signo, 0, code, os.getpid(), 0, value).ljust(128, b"\0")


def test_process_state_steps(restorers, tmp_path):
    r = restorers()
    r.start("any")
    pid = r.pid
    data_file = tmp_path / "data"
    data_file.write_bytes(b"0123456789")

    r.close_fds(50)
    r.sync()
    assert r.remote_channel_fd == 50 and os.listdir(f"/proc/{pid}/fd") == ["50"]

    r.open_fd(3, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, 5, True, data_file)
    r.open_fd(0, os.O_RDONLY, 0, False, "/dev/null")  # the lowest free fd: opened in place
    r.chdir(tmp_path)
    r.umask(0o027)
    r.rlimit(7, 256, 512)  # RLIMIT_NOFILE
    r.personality(0x0040000)  # ADDR_NO_RANDOMIZE
    r.comm("restored-process-name")
    r.sigaction(signal.SIGUSR1, 0x12340000, 0x04000000 | 0x10000000, 0x12350000,
                signal_bit(signal.SIGUSR2))  # SA_RESTORER | SA_RESTART
    r.sigaction(signal.SIGUSR2, 1, 0, 0, 0)  # SIG_IGN
    r.sigqueue(signal.SIGUSR1, True, siginfo(signal.SIGUSR1))
    r.sigqueue(signal.SIGRTMIN + 2, False, siginfo(signal.SIGRTMIN + 2, value=7))
    r.sigaltstack(DATA + 4096, 0, 8192)
    r.map(DATA, 16384, prot=PROT_RW)
    r.sync()
    # The rseq area must hold sane contents (rseq_cs 0) before registering it.
    write_memory(pid, DATA, struct.pack("<IIQ", 0xFFFFFFFF, 0xFFFFFFFF, 0).ljust(32, b"\0"))
    r.rseq(DATA, 32, 0, 0x53053053)
    r.tid_address(DATA + 64)
    r.sync()

    fdinfo = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/fdinfo/3").read_text().splitlines())
    assert int(fdinfo["pos"]) == 5
    assert int(fdinfo["flags"], 8) & (os.O_ACCMODE | os.O_APPEND | os.O_CLOEXEC) == \
        os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    assert os.readlink(f"/proc/{pid}/fd/3") == str(data_file)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert int(Path(f"/proc/{pid}/fdinfo/0").read_text().split("flags:")[1].split()[0], 8) \
        & os.O_CLOEXEC == 0
    assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
    assert status_field(pid, "Umask") == ["0027"]
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max open files\s+256\s+512\s", limits)
    assert Path(f"/proc/{pid}/personality").read_text().strip() == "00040000"
    assert Path(f"/proc/{pid}/comm").read_text() == "restored-proces\n"  # 15 bytes and the NUL
    assert int(status_field(pid, "SigCgt")[0], 16) == signal_bit(signal.SIGUSR1)
    # Ignored signals survive exec: the restorer starts with what any child of this test ignores.
    sibling = subprocess.run(["grep", "^SigIgn", "/proc/self/status"], capture_output=True, text=True, check=True)
    inherited = int(sibling.stdout.split()[1], 16) & ~signal_bit(signal.SIGUSR1)
    assert int(status_field(pid, "SigIgn")[0], 16) == inherited | signal_bit(signal.SIGUSR2)
    assert int(status_field(pid, "ShdPnd")[0], 16) == signal_bit(signal.SIGUSR1)
    assert int(status_field(pid, "SigPnd")[0], 16) == signal_bit(signal.SIGRTMIN + 2)
    cpu_id_start, cpu_id = struct.unpack("<II", read_memory(pid, DATA, 8))
    assert cpu_id_start == cpu_id < os.cpu_count()  # the kernel updates a registered area


@pytest.mark.parametrize("dumpable", [True, False])
def test_creds(restorers, dumpable):
    r = restorers()
    r.start("any")
    r.creds((65534, 65534, 65534, 65534), (65534, 65534, 65534, 65533), (100, 65534),
            dumpable=dumpable)
    r.sync()
    assert status_field(r.pid, "Uid") == ["65534"] * 4
    assert status_field(r.pid, "Gid") == ["65534"] * 3 + ["65533"]
    assert sorted(status_field(r.pid, "Groups")) == ["100", "65534"]
    # the files in /proc/PID belong to root while the process is not dumpable
    assert os.stat(f"/proc/{r.pid}/status").st_uid == (65534 if dumpable else 0)


def anon_vma_names_supported():
    buf = mmap.mmap(-1, mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ok = _libc.prctl(0x53564D41, 0, ctypes.c_ulong(address), ctypes.c_ulong(mmap.PAGESIZE),
                     b"probe") == 0
    return ok


def test_vma_name(restorers):
    r = restorers()
    r.start("any")
    r.map(DATA, 8192, prot=PROT_RW)
    r.vma_name(DATA, 8192, "umig-test")
    if anon_vma_names_supported():
        r.sync()
        assert [n for s, *_, n in mappings(r.pid) if s == DATA] == ["[anon:umig-test]"]
    else:
        with pytest.raises(RestoreStepError, match="'vma_name' failed at 0x300000000.*EINVAL"):
            r.sync()


# ---- failures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["any", "ns"])
def test_map_over_a_mapping_fails(restorers, mode):
    before = our_children()
    r = restorers()
    r.start(mode, 99)
    taken = mappings(r.pid)[0][0]
    r.map(taken, 4096, prot=PROT_RW)
    with pytest.raises(RestoreStepError) as failure:
        r.sync()
    assert str(failure.value) == \
        f"restore step 'map' failed at {taken:#x}: File exists (EEXIST)"
    assert failure.value.step == "map" and failure.value.errno == errno.EEXIST
    assert_nothing_left(r, before)
    assert r.exit_status is not None and os.waitstatus_to_exitcode(r.exit_status) == 1


def test_relocate_needs_room_for_image_and_stack(restorers):
    r = restorers()
    r.start("any")
    r.relocate(HOLE, r.hole_size - 4096)
    with pytest.raises(RestoreStepError, match=r"'relocate' failed at 0x200000000.*EINVAL"):
        r.sync()


@pytest.mark.parametrize("mode", ["any", "ns"])
def test_failure_while_traced_leaves_nothing(restorers, mode):
    """A traced child's exit waits for its tracer: the client must not hang on it."""
    before = our_children()
    r = restorers()
    r.start(mode, 97)
    ptrace(PTRACE_SEIZE, r.pid, None, None)
    r.map(mappings(r.pid)[0][0], 4096, prot=PROT_RW)
    with pytest.raises(RestoreStepError, match="'map' failed.*EEXIST"):
        r.sync()
    assert_nothing_left(r, before)


def test_open_fd_of_a_missing_path_fails(restorers):
    before = our_children()
    r = restorers()
    r.start("any")
    with pytest.raises(RestoreStepError) as failure:
        r.umask(0o22)
        r.open_fd(5, os.O_RDONLY, 0, False, "/no/such/file")
        r.umask(0o22)  # pipelined after the failing step: never executed
        r.finish()  # the failure surfaces at whichever call sees its report
    assert str(failure.value) == ("restore step 'open_fd' failed for fd 5 (/no/such/file): "
                                  "No such file or directory (ENOENT)")
    assert_nothing_left(r, before)


@pytest.mark.parametrize("mode", ["any", "ns"])
def test_death_without_a_report_names_the_step(restorers, mode):
    before = our_children()
    r = restorers()
    r.start(mode, 98)
    r.umask(0o22)
    r.sync()
    os.kill(r.pid, signal.SIGSTOP)  # so that the next step stays unanswered
    r.chdir("/")
    r.umask(0o22)
    r.flush()
    os.kill(r.pid, signal.SIGKILL)
    with pytest.raises(RestoreStepError) as failure:
        r.sync()
    assert str(failure.value) == ("restore step 'chdir' failed (/): the restorer died without a "
                                  "report (killed by SIGKILL); steps sent up to 'umask'")
    assert failure.value.step == "chdir" and failure.value.errno is None
    assert_nothing_left(r, before)


def test_death_between_steps_is_reported_at_the_next(restorers):
    """Steps are queued and go out together at the next wait: a restorer that died before is
    reported after its last step, not at the steps it was never sent."""
    r = restorers()
    r.start("any")
    r.umask(0o22)
    r.sync()
    os.kill(r.pid, signal.SIGKILL)
    os.waitid(os.P_PID, r.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
    r.chdir("/")
    r.umask(0o27)
    with pytest.raises(RestoreStepError,
                       match=r"^the restorer died after step 'umask' \(killed by SIGKILL\)$"):
        r.sync()
