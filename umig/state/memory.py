"""Memory: every mapping of /proc/PID/maps, the pages that must travel, and the vDSO set.

Dump: classify each mapping, then find its pages with the PAGEMAP_SCAN ioctl (present or swapped;
for private file mappings only the pages the process wrote) and read them in large vectored
batches. Restore: choose a hole for the restorer, clear its old mappings, move the vDSO set,
map every mapping at its exact address, fill the pages, then set the final protections.
"""
import bisect
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import itertools
import mmap
import os
import re
import stat
import struct

from umig import procfs
from umig.errors import Refused, UmigError
from umig.procfs import PAGE_SIZE

PROT_READ, PROT_WRITE, PROT_EXEC = mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x0100, 0x4000
# VmFlags (proc(5)) that madvise() sets, with their advice. Besides their own effect they keep the
# kernel from merging the mapping with a neighbour that lacks them, so the layout depends on them.
MADVISED = {"dd": 16, "dc": 10, "wf": 18, "hg": 14, "nh": 15, "mg": 12}  # MADV_DONTDUMP, ...
MADV_DONTNEED, MADV_REMOVE, MADV_POPULATE_WRITE = 4, 9, 23
_USERFAULTFD_FLAGS = {"um", "uw", "ui"}

# Special mappings of the kernel's vDSO family ([vvar], [vvar_vclock], [vdso], ...): code in the vDSO
# finds its data by fixed offsets, so the set moves as one block and keeps its layout.
_VDSO_NAME = re.compile(r"\[(vvar|vdso)[a-z_]*\]")
# The shared anonymous memory of MAP_SHARED|MAP_ANONYMOUS lives in an unlinked shmem file.
_SHARED_ANON_NAMES = re.compile(r"/dev/zero \(deleted\)|\[anon_shmem:.*\]")
BATCH_BYTES = 1 << 20

# PAGEMAP_SCAN (linux/fs.h, kernel >= 6.7): page categories and the ioctl's argument.
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO = 1 << 2, 1 << 3, 1 << 4, 1 << 5


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16
_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_writev.restype = _libc.process_vm_readv.restype = ctypes.c_ssize_t


def _prot(perms):
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def _perms(prot, shared):
    return "".join(c if prot & bit else "-" for c, bit in (("r", PROT_READ), ("w", PROT_WRITE), ("x", PROT_EXEC))) \
        + ("s" if shared else "p")


# --- classification (also the pre-freeze check) ---------------------------------------------------

def classify(pid, entry, vmflags):
    """The kind of a mapping, or raise Refused naming it."""
    path = entry.path
    where = f"mapping {entry.start:x}-{entry.end:x}"
    if "lo" in vmflags:
        raise Refused(f"{where} ({path or 'anonymous'}) is locked in memory (mlock), which does not move yet")
    if path == "[vsyscall]":
        return "vsyscall"
    if _VDSO_NAME.fullmatch(path):
        return "vdso"
    if path == "[heap]":
        return "heap"
    if path == "[stack]":
        return "stack"
    if entry.shared and _SHARED_ANON_NAMES.fullmatch(path):
        return "shared_anon"
    if path == "" or path.startswith("[anon:"):
        if entry.shared:
            raise Refused(f"{where}: shared anonymous memory of an unknown kind")
        return "anon"
    if path.startswith("["):
        raise Refused(f"{where}: special mapping {path} is not supported")
    if path.endswith(" (deleted)"):
        raise Refused(f"{where}: file {path[:-10]} was deleted (memfd, SysV shm and unlinked files are not supported)")
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(f"{where}: file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{where}: {path} is not a regular file (device mappings are not supported)")
    if not procfs.same_file(procfs.proc_path(pid, "map_files", f"{entry.start:x}-{entry.end:x}"), path):
        raise Refused(f"{where}: {path} is another file where umig looks (the process has its own mount namespace)")
    return "shared_file" if entry.shared else "file"


def _any_locked(status):
    """Whether some mapping may be locked in memory (mlock), known from /proc/PID/status without
    smaps, which walks the page tables of every mapping (milliseconds for a large sparse one).
    VmLck counts the whole size of the locked mappings, whether their pages are present or not
    (MLOCK_ONFAULT, MCL_FUTURE too): when it is 0 kB, none is. Without the field (no mm), smaps
    decides."""
    return status.get("VmLck") != "0 kB"


def check(pid):
    blockers = []
    smaps = procfs.smaps(pid) if _any_locked(procfs.status(pid)) else {}
    for entry in procfs.maps(pid):
        try:
            classify(pid, entry, smaps.get(entry.start, []))
        except Refused as e:
            blockers.append(str(e))
    return blockers


# --- file identity ---------------------------------------------------------------------------------

def _elf_build_id(f):
    """The GNU build-id note of an ELF file, or None."""
    head = f.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return None
    e_phoff = int.from_bytes(head[32:40], "little")
    e_phentsize = int.from_bytes(head[54:56], "little")
    e_phnum = int.from_bytes(head[56:58], "little")
    for i in range(e_phnum):
        f.seek(e_phoff + i * e_phentsize)
        ph = f.read(e_phentsize)
        if int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
            continue
        offset, size = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
        f.seek(offset)
        notes = f.read(size)
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, kind = (int.from_bytes(notes[pos + k:pos + k + 4], "little") for k in (0, 4, 8))
            name_end = pos + 12 + ((namesz + 3) & ~3)
            if kind == 3 and notes[pos + 12:pos + 12 + namesz] == b"GNU\0":  # NT_GNU_BUILD_ID
                return notes[name_end:name_end + descsz].hex()
            pos = name_end + ((descsz + 3) & ~3)
    return None


def file_identity(path, content=True):
    """Size, mtime and (with content) the ELF build-id or else a SHA-256 of the bytes."""
    st = os.stat(path)
    identity = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content:
        identity.update(_content_identity(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return identity


def identify_files(pid):
    """Identify the contents of the files pid maps now, while it runs: the freeze then finds them
    known (the cache's key holds all a change of the file would change) instead of reading and
    hashing them, milliseconds of the first freeze of a Python interpreter."""
    for entry in procfs.maps(pid):
        if entry.inode and not entry.shared and entry.path.startswith("/"):
            with contextlib.suppress(OSError):
                file_identity(entry.path)


def forget_file_contents():
    """Each migration identifies file contents anew: a file written through a shared mapping may
    keep its mtime for a while, and the agent lives long."""
    _content_identity.cache_clear()


@functools.lru_cache(maxsize=1024)
def _content_identity(path, device, inode, size, mtime_ns, ctime_ns):
    """Cached, within one migration, by everything a change to the file would change (ctime
    included, which no one can set back): the final state looks at the same files again."""
    with open(path, "rb") as f:
        build_id = _elf_build_id(f)
        if build_id:
            return {"build_id": build_id}
        f.seek(0)
        return {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def check_identity(path, identity, what, settled=True):
    """Raise if the file at path is not the one the image was made from. Not `settled`: the
    process still runs and may change it (grow a log it writes) before this look: then only
    that it is there, and its contents where they were identified; its size and times wait for
    the final state."""
    try:
        here = file_identity(path, content="build_id" in identity or "sha256" in identity)
    except OSError as e:
        raise UmigError(f"{what} {path}: {e.strerror} on the target") from None
    for key in ("build_id", "sha256", "size", "mtime_ns") if settled else ("build_id", "sha256"):
        if key in identity and here.get(key) != identity[key]:
            raise UmigError(f"{what} {path} differs on the target ({key} {here.get(key)} != {identity[key]})")


# --- dump --------------------------------------------------------------------------------------------

def scan(pagemap_fd, start, end, anyof, returned, required=0, flags=0):
    """(start, end, categories) regions of [start, end) whose pages have every category of
    `required` and any of `anyof`; `flags` (PM_SCAN_*) act on the pages it reports."""
    vec = (_PageRegion * 512)()
    # The regions as plain integers in one call: a ctypes object for each of thousands of
    # scattered pages cost more than the kernel's walk.
    words = memoryview(vec).cast("B").cast("Q")
    while start < end:
        arg = _ScanArg(size=ctypes.sizeof(_ScanArg), flags=flags, start=start, end=end, vec=ctypes.addressof(vec),
                       vec_len=len(vec), category_mask=required, category_anyof_mask=anyof, return_mask=returned)
        n = _libc.ioctl(pagemap_fd, ctypes.c_ulong(_PAGEMAP_SCAN), ctypes.byref(arg))
        if n < 0:
            err = ctypes.get_errno()
            raise UmigError(f"PAGEMAP_SCAN on [{start:x}, {end:x}) failed: {os.strerror(err)} "
                            "(needs Linux 6.7 or later)")
        regions = iter(words[:3 * n].tolist())
        yield from zip(regions, regions, regions)
        start = arg.walk_end


def _shmem_runs(pid, mapping):
    """The allocated ranges of a shared anonymous mapping's shmem file: its pages may be in memory
    or swap without being mapped in this process, which the page tables would not show."""
    fd = os.open(procfs.proc_path(pid, "map_files", f"{mapping['start']:x}-{mapping['end']:x}"), os.O_RDONLY)
    try:
        runs, position = [], mapping["offset"]
        end = position + mapping["end"] - mapping["start"]
        while position < end:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after position
                break
            if data >= end:
                break
            position = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            runs.append([mapping["start"] + data - mapping["offset"], position - data])
        return runs
    finally:
        os.close(fd)


def _carried_runs(pid, pagemap_fd, mappings, every_mapping):
    """For each of these mappings (in address order), its page runs that must travel, as
    [start, length] pairs. One PAGEMAP_SCAN covers a series of scanned mappings (a call for each
    cost more than the kernel's walk in a process of some sixty): with `every_mapping` (the list
    is all a frozen process has) a gap between two holds nothing to walk and the series goes on
    across it; otherwise only touching mappings join."""
    carried = [[] for _ in mappings]
    series = []  # indices of the mappings of the series being gathered

    def scan_series():
        # (start, end, file, runs) of each member, and the current one in local names: Python's
        # work for each region costs as much as the kernel's walk for a sparse mapping, where
        # each page is a region.
        members = [(mappings[i]["start"], mappings[i]["end"], mappings[i]["kind"] == "file", carried[i])
                   for i in series]
        j = 0
        m_start, m_end, file, runs = members[0]
        for start, end, categories in scan(pagemap_fd, m_start, members[-1][1], PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                                            PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_PFNZERO):
            if categories & PAGE_IS_PFNZERO:
                continue  # the shared zero page: reads as zeros wherever it is mapped again
            while start >= m_end and j + 1 < len(members):
                j += 1
                m_start, m_end, file, runs = members[j]
            # Still the file's own page: mapping the file again brings it back.
            files_own = categories & PAGE_IS_FILE and not categories & PAGE_IS_SWAPPED
            if end <= m_end:  # nearly always: within the current member
                if m_start < end and not (file and files_own):
                    add_run(runs, max(start, m_start), end)
                continue
            for a, b, member_file, member_runs in members[j:]:  # cut at the members it spans
                if a >= end:
                    break
                if start < b and not (member_file and files_own):
                    add_run(member_runs, max(start, a), min(end, b))
        series.clear()

    for i, m in enumerate(mappings):
        if m["kind"] in _SCANNED_KINDS:
            if series and not every_mapping and mappings[series[-1]]["end"] != m["start"]:
                scan_series()
            series.append(i)
            continue
        if series:
            scan_series()
        if m["kind"] == "shared_anon":
            with contextlib.suppress(FileNotFoundError):  # a running process may have unmapped it
                carried[i] = _shmem_runs(pid, m)
    if series:
        scan_series()
    return carried


def add_run(runs, start, end):
    """Append [start, end) to sorted runs, joining the last run when it touches it."""
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1][1] += end - start
    else:
        runs.append([start, end - start])


def present_runs(pid, mappings):
    """The runs of these mappings' pages that would travel now, in a process that may be
    running: a shared mapping it has unmapped meanwhile has none (the final state sends what
    it has then)."""
    pagemap_fd = os.open(procfs.proc_path(pid, "pagemap"), os.O_RDONLY)
    try:
        return [run for runs in _carried_runs(pid, pagemap_fd, mappings, every_mapping=False) for run in runs]
    finally:
        os.close(pagemap_fd)


# smaps, the only source of the VmFlags, walks every page table, and so does the scan for the pages
# to carry. With this many page tables (VmPTE; 256 of them map at least half a GiB) smaps is read
# on a second thread while the scan runs (both only read the page tables): the shorter walk hides
# behind the longer one (64 GiB sparse mapping with 2,560 pages in 10 MiB of page tables: 6.3 ->
# 4.2 ms; a resident GiB: smaps 7-12 ms, the scan 4-5). With fewer, starting the thread and
# sharing the interpreter lock cost more than the walks (a CPython process of 30 MiB, 100 kB of
# page tables: 2.2 ms against 1.5).
WALK_ON_A_THREAD_KIB = 1024


def _kib(field):
    """A /proc/PID/status size ("1234 kB") in KiB; 0 without it."""
    return int(field.split()[0]) if field else 0


def _layout(pid, status):
    """The mappings (procfs.MapsEntry) of a stopped process, and a function returning their
    VmFlags by start address. smaps has both (a mapping's block begins with its maps line): it
    is read once, without maps (0.15 ms of a CPython process's freeze). With
    WALK_ON_A_THREAD_KIB of page tables, maps gives the mappings and smaps is read on a thread
    started now, for the function to wait for (and parse then: on the thread, parsing would
    hold the interpreter lock while the scan runs)."""
    if _kib(status.get("VmPTE")) < WALK_ON_A_THREAD_KIB:
        entries, vmflags = procfs.parse_smaps(procfs.read_text(pid, "smaps"))
        return entries, lambda: vmflags
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        text = reader.submit(procfs.read_text, pid, "smaps").result
    finally:
        reader.shutdown(wait=False)  # the thread ends once it has read
    return procfs.maps(pid), lambda: procfs.parse_smaps(text())[1]


def dump(pid, status):
    """The memory section of the image, and the page runs to read (in address order), of a
    stopped process whose procfs.status() this is."""
    mappings, files, runs = [], {}, []
    kinds = {}  # a file's several mappings (text, data, ...) are one file to look at
    entries, vmflags = _layout(pid, status)
    locked = vmflags() if _any_locked(status) else {}
    for entry in entries:
        flags = locked.get(entry.start, [])
        same_file = (entry.path, entry.device, entry.inode, entry.shared, "lo" in flags)
        if not entry.inode or same_file not in kinds:
            kinds[same_file] = classify(pid, entry, flags)
        kind = kinds[same_file]
        mapping = {"start": entry.start, "end": entry.end, "prot": _prot(entry.perms),
                   "shared": entry.shared, "offset": entry.offset, "kind": kind, "path": entry.path}
        if kind in ("file", "shared_file") and entry.path not in files:
            files[entry.path] = file_identity(entry.path, content=kind == "file")
        if kind == "vdso":
            mapping["sha256"] = _vdso_digest(pid, entry)
        mappings.append(mapping)
    pagemap_fd = os.open(procfs.proc_path(pid, "pagemap"), os.O_RDONLY)
    try:
        carried = _carried_runs(pid, pagemap_fd, mappings, every_mapping=True)
    finally:
        os.close(pagemap_fd)
    flags_by_start = vmflags()
    for mapping, mapping_runs in zip(mappings, carried):
        mapping["pages"] = sum(length for _, length in mapping_runs) // PAGE_SIZE
        runs.extend(mapping_runs)
        # Registrations with a userfaultfd (um, uw, ui) are the live write tracker's: they do not
        # travel, nor tell a mapping from the one built before the tracker was armed.
        mapping["vmflags"] = [flag for flag in flags_by_start[mapping["start"]] if flag not in _USERFAULTFD_FLAGS]
    return {"mappings": mappings, "files": files}, runs


def intersect(a, b):
    """The overlap of two sorted lists of [start, length] runs."""
    out, i, j = [], 0, 0
    # Each run unpacked once and compared without max() and min(): a third of the time (300 runs
    # against 400: 88 against 252 us), and the freeze's interval arithmetic does a few of these.
    while i < len(a) and j < len(b):
        a_start, a_length = a[i]
        b_start, b_length = b[j]
        a_end, b_end = a_start + a_length, b_start + b_length
        start = a_start if a_start > b_start else b_start
        end = a_end if a_end < b_end else b_end
        if start < end:
            out.append([start, end - start])
        if a_end < b_end:
            i += 1
        else:
            j += 1
    return out


def union(a, b):
    """Two sorted lists of runs merged into one, overlapping and touching runs joined."""
    out = []
    for start, length in sorted(a + b):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return out


def complement(runs, start, end):
    """The gaps of [start, end) that sorted runs leave."""
    gaps, position = [], start
    for run_start, length in runs:
        if run_start >= end:
            break
        if run_start > position:
            gaps.append([position, run_start - position])
        position = max(position, run_start + length)
    if position < end:
        gaps.append([position, end - position])
    return gaps


def read_batches(pid, runs, batch_bytes=BATCH_BYTES, zero_spans=(), tolerant=False, ring=1):
    """Yield (runs, buffer) batches of about batch_bytes. Pages that are all zeros inside
    `zero_spans` (fresh anonymous memory on the target, where zeros are what an untouched page
    reads) are left out.

    A ring of `ring` buffers serves every batch in turn (a fresh megabyte per batch costs page
    faults that halve the throughput): a batch must be consumed before `ring` more are asked
    for. `tolerant` skips what cannot be read (a running process may unmap memory between the
    scan and the read)."""
    mem = _ProcessMemory(pid)
    size = min(batch_bytes, sum(length for _, length in runs))
    stores = []

    def next_buffer():
        stores.append(bytearray(size) if len(stores) < ring else stores.pop(0))  # the oldest, once all exist
        return memoryview(stores[-1])

    buffer = None
    try:
        for pieces in _pieces(runs, size):
            # A new buffer only once the last one was yielded: a batch left empty (all zero pages,
            # or nothing readable any more) must not advance the ring.
            buffer = buffer or next_buffer()
            batch_runs, filled = _read_pieces(mem, buffer, pieces, tolerant)
            # A page whose first word is not zero is not all zeros: that is most pages, and looking
            # at one word a page costs a tenth of searching the batch for a zero page (which
            # stumbles on every run of zero bytes).
            if zero_spans and 0 in buffer[:filled].cast("Q")[::PAGE_SIZE // 8].tolist():
                batch_runs, filled = _without_zero_pages(buffer, batch_runs, zero_spans)
            if filled:
                yield batch_runs, buffer[:filled]
                buffer = None
    finally:
        mem.close()


class _ProcessMemory:
    """/proc/PID/mem, opened when first needed: process_vm_readv reads nearly everything, and
    an open costs a tenth of answering a fault."""

    def __init__(self, pid):
        self.pid, self.fd = pid, None

    def read_into(self, view, address):
        """Whether all of view could be read from address."""
        if self.fd is None:
            self.fd = os.open(procfs.proc_path(self.pid, "mem"), os.O_RDONLY)
        try:
            return os.preadv(self.fd, [view], address) == len(view)
        except OSError:
            return False

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


def _pieces(runs, size):
    """The runs cut into lists of [start, length] pieces of `size` bytes together (the last less)."""
    pieces, filled = [], 0
    for start, length in runs:
        while length:
            take = min(length, size - filled)
            pieces.append([start, take])
            filled += take
            start += take
            length -= take
            if filled == size:
                yield pieces
                pieces, filled = [], 0
    if pieces:
        yield pieces


def _read_pieces(mem, buffer, pieces, tolerant):
    """Read pieces into `buffer`, end to end: the pieces read and how many bytes they fill.

    process_vm_readv, IOV_MAX pieces a call: a call per piece, on /proc/PID/mem, cost more than
    the kernel's copy for scattered pages (2,560 single pages: 7-11 ms against 3.7), and it is
    faster for long runs too (4.9 GiB/s against 4.3). It respects the page protections:
    a piece it stops at (PROT_NONE) is read from /proc/PID/mem, which does not."""
    read, filled, position = [], 0, 0
    with buffer_address(buffer) as base:
        while position < len(pieces):
            chunk = pieces[position:position + IOV_MAX]
            got = max(_process_vm(_libc.process_vm_readv, mem.pid, chunk, base + filled), 0)
            for piece in chunk:
                if got < piece[1]:
                    break
                read.append(piece)
                filled += piece[1]
                got -= piece[1]
                position += 1
            else:
                continue
            start, length = pieces[position]
            if mem.read_into(buffer[filled:filled + length], start):
                read.append(pieces[position])
                filled += length
            elif not tolerant:
                raise UmigError(f"reading pid {mem.pid}'s memory at {start:x} failed")
            position += 1
    return read, filled


_ZERO_PAGE = bytes(PAGE_SIZE)


def _without_zero_pages(buffer, runs, zero_spans):
    """Compact a batch in place, dropping its all-zero pages that lie in zero_spans."""
    kept, write, read = [], 0, 0
    for start, length in runs:
        for offset in range(0, length, PAGE_SIZE):
            page, source = start + offset, read + offset
            if buffer[source:source + PAGE_SIZE] == _ZERO_PAGE and intersect([[page, PAGE_SIZE]], zero_spans):
                continue
            if write != source:
                buffer[write:write + PAGE_SIZE] = buffer[source:source + PAGE_SIZE]
            if kept and kept[-1][0] + kept[-1][1] == page:
                kept[-1][1] += PAGE_SIZE
            else:
                kept.append([page, PAGE_SIZE])
            write += PAGE_SIZE
        read += length
    return kept, write


# Where the target maps fresh anonymous memory: an all-zero page there need not travel.
FRESH_KINDS = ("anon", "heap", "stack", "shared_anon")
# Memory that userfaultfd can fill (missing-page mode): private anonymous memory.
PRIVATE_ANON_KINDS = ("anon", "heap", "stack")
_SCANNED_KINDS = PRIVATE_ANON_KINDS + ("file",)  # whose pages the page tables tell


def spans(section, kinds):
    """The [start, length] spans of the section's mappings of these kinds."""
    return [[m["start"], m["end"] - m["start"]] for m in section["mappings"] if m["kind"] in kinds]


# --- restore -----------------------------------------------------------------------------------------

def _vdso_digest(pid, entry):
    """SHA-256 of a part of the vDSO set as the process reads it; None where it cannot be read
    (the data pages): the code must match exactly, the data is the kernel's own."""
    with open(procfs.proc_path(pid, "mem"), "rb", buffering=0) as mem:
        mem.seek(entry.start)
        try:
            return hashlib.sha256(mem.read(entry.size)).hexdigest()
        except OSError:
            return None


def vdso_layout(parts):
    """The vDSO set's parts (name, start, end), as (name, offset from its first part, size)."""
    return [(path, start - parts[0][1], end - start) for path, start, end in parts]


def check_target(section, final=False, settled=True):
    """Refuse an image this host cannot rebuild: another vDSO, or files that changed. A live or
    lazy move's first state is not `settled` (the process runs on, and may write a file it maps
    shared: its size and times change); its `final` layout checks every file whole, and not the
    vDSO again."""
    if final:
        for path, identity in section["files"].items():
            check_identity(path, identity, "mapped file")
        return
    image_vdso = [m for m in section["mappings"] if m["kind"] == "vdso"]
    image_layout = vdso_layout([(m["path"], m["start"], m["end"]) for m in image_vdso])
    here = [e for e in procfs.maps("self") if _VDSO_NAME.fullmatch(e.path)]
    here_layout = vdso_layout([(e.path, e.start, e.end) for e in here])
    if image_layout != here_layout:
        describe = lambda layout: ", ".join(f"{name} {size // 1024} KiB" for name, _, size in layout) or "none"
        raise UmigError(f"the target kernel's vDSO layout ({describe(here_layout)}) differs from "
                        f"the source's ({describe(image_layout)})")
    for mapping, entry in zip(image_vdso, here):
        if mapping.get("sha256") and _vdso_digest("self", entry) != mapping["sha256"]:
            raise UmigError(f"the target kernel's {mapping['path']} differs from the source's "
                            "(another kernel build): the process holds pointers into it")
    for path, identity in section["files"].items():
        check_identity(path, identity, "mapped file", settled)


def find_hole(section, restorer_entries, size):
    """The highest free range of `size` bytes that overlaps neither an image mapping nor anything
    the restorer has mapped now, with a megabyte of margin (stack guard gaps) on each side."""
    margin = 1 << 20
    top = 0x7FFFFFFFF000  # the end of the user address space ([vsyscall] lies beyond it)
    taken = sorted(r for r in [(m["start"], m["end"]) for m in section["mappings"]] +
                   [(e.start, e.end) for e in restorer_entries] if r[0] < top)
    candidates = []
    previous_end = 0x10000000
    for start, end in taken + [(top, top)]:
        if start - margin - size >= previous_end + margin:
            candidates.append(start - margin - size)
        previous_end = max(previous_end, end)
    if not candidates:
        raise UmigError("no free address range for the restorer: the image fills the address space")
    return candidates[-1] & ~(PAGE_SIZE - 1)


def prepare(restorer, section, restorer_entries):
    """Relocate the restorer into a hole, clear its old mappings, move the vDSO set to its old
    place and map every mapping of the image (writable where pages will be filled). Returns the
    hole, which later mappings must avoid too."""
    vdso_parts = [e for e in restorer_entries if _VDSO_NAME.fullmatch(e.path)]
    vdso_size = sum(e.size for e in vdso_parts)
    hole_size = restorer.hole_size + vdso_size  # its image and stack, then a parking place
    hole = find_hole(section, restorer_entries, hole_size)
    restorer.relocate(hole, hole_size)
    for entry in restorer_entries:
        if entry.path != "[vsyscall]" and not _VDSO_NAME.fullmatch(entry.path):
            restorer.unmap(entry.start, entry.size)
    hole_entry = procfs.MapsEntry(hole, hole + hole_size, "rwxp", 0, "", 0, "")
    _move_vdso(restorer, [(e.path, e.start, e.size) for e in vdso_parts], section, hole_entry)
    _map_all(restorer, section, [hole_entry])
    return hole_entry


def _move_vdso(restorer, parts, section, hole):
    """Move each part of the vDSO set (vvar, vdso: `parts`, (path, start, size)) to where
    `section` has the part of that name, through a parking place at the end of the restorer's
    `hole`: the old and new places may overlap."""
    places = {m["path"]: m["start"] for m in section["mappings"] if m["kind"] == "vdso"}
    spot, parked = hole.end - sum(size for _, _, size in parts), []
    for path, start, size in parts:
        restorer.move(start, spot, size)
        parked.append((path, spot, size))
        spot += size
    for path, spot, size in parked:
        restorer.move(spot, places[path], size)


def _would_merge(a, b):
    """Whether the kernel would join b to the anonymous mapping a just below it, as it does
    when their flags match (on the source they stayed apart: one of them was moved by mremap,
    or their anon_vmas differ, which /proc does not show). Only writable ones are kept apart:
    the way to do it needs a page in b."""
    return (a["end"] == b["start"] and a["kind"] == b["kind"] == "anon" and not a["shared"] and not b["shared"]
            and _filling_prot(a) == _filling_prot(b) and _filling_prot(b) & PROT_WRITE
            and a["vmflags"] == b["vmflags"])


def _map_all(restorer, section, taken, built=frozenset()):
    """Map the mappings of `section` in address order, but those already `built`. One that the
    kernel would merge with its neighbour below is made elsewhere and moved into place with
    mremap: a moved anonymous mapping that has a page keeps its page offset, which no longer
    continues its neighbour's, so the two stay apart as they were."""
    previous = None
    for m in section["mappings"]:
        if same_mapping(m) in built:
            pass
        elif previous is not None and _would_merge(previous, m):
            detour = find_hole(section, taken, m["end"] - m["start"])
            _map(restorer, dict(m, start=detour, end=detour + m["end"] - m["start"]))
            # mremap lets an anonymous mapping that never had a page take its new place's offset:
            # one page makes it keep its own (and is dropped again once it is there).
            restorer.madvise(detour, PAGE_SIZE, MADV_POPULATE_WRITE)
            restorer.move(detour, m["start"], m["end"] - m["start"])
            restorer.madvise(m["start"], PAGE_SIZE, MADV_DONTNEED)
        else:
            _map(restorer, m)
        previous = m


def _filling_prot(m):
    """The protection a mapping is made with: writable (and readable) while pages will be filled."""
    return m["prot"] | (PROT_READ | PROT_WRITE if m["pages"] else 0)


def _map(restorer, m):
    if m["kind"] in ("vdso", "vsyscall"):
        return
    if m["kind"] in ("file", "shared_file"):
        flags = MAP_SHARED if m["shared"] else MAP_PRIVATE
        # "mw": it may be made writable later, which a read-only open would forbid.
        open_flags = os.O_RDWR if m["shared"] and "mw" in m["vmflags"] else os.O_RDONLY
        restorer.map(m["start"], m["end"] - m["start"], m["offset"], _filling_prot(m), flags, open_flags, m["path"])
    else:
        flags = (MAP_SHARED if m["shared"] else MAP_PRIVATE) | MAP_ANONYMOUS \
            | (MAP_GROWSDOWN if m["kind"] == "stack" else 0) | (MAP_NORESERVE if "nr" in m["vmflags"] else 0)
        restorer.map(m["start"], m["end"] - m["start"], 0, _filling_prot(m), flags, 0, None)
    for flag in m["vmflags"]:
        if flag in MADVISED:
            restorer.madvise(m["start"], m["end"] - m["start"], MADVISED[flag])


def same_mapping(m):
    """What must be equal for a mapping of a later layout to be the one already built."""
    return (m["start"], m["end"], m["prot"], m["shared"], m["offset"], m["kind"], m["path"],
            tuple(m["vmflags"]), _filling_prot(m))


def relayout(restorer, old, new, discard, hole):
    """Turn the layout built from `old` into `new` (a live migration's final state): mappings that
    went or changed are unmapped, new and changed ones mapped (away from the restorer's `hole`);
    pages the process dropped since they were sent are dropped here too (MADV_DONTNEED: zeros,
    or the file's own page again; in shared memory MADV_REMOVE, which frees the pages of the
    shmem file itself)."""
    for m in new["mappings"]:
        if m["start"] < hole.end and hole.start < m["end"]:
            # Only a new program (execve since the first state) lays out memory so differently.
            raise UmigError(f"mapping {m['start']:#x}-{m['end']:#x} of the final state lies where the restorer "
                            f"runs on the target, chosen after the first state ({hole.start:#x}-{hole.end:#x}): "
                            "try again")
    kept = {same_mapping(m) for m in new["mappings"]} & {same_mapping(m) for m in old["mappings"]}
    for m in old["mappings"]:
        if same_mapping(m) not in kept and m["kind"] not in ("vdso", "vsyscall"):
            restorer.unmap(m["start"], m["end"] - m["start"])
    old_vdso, new_vdso = ([(m["path"], m["start"], m["end"] - m["start"]) for m in section["mappings"]
                           if m["kind"] == "vdso"] for section in (old, new))
    if old_vdso != new_vdso:
        _move_vdso(restorer, old_vdso, new, hole)  # it executed another program (execve) meanwhile
    _map_all(restorer, new, [hole], built=kept)
    shared = spans(new, ("shared_anon",))
    for start, length in intersect(discard, complement(shared, 0, 2 ** 64)):
        restorer.madvise(start, length, MADV_DONTNEED)
    for start, length in intersect(discard, shared):
        restorer.madvise(start, length, MADV_REMOVE)


UFFD_FEATURE_SIGBUS = 1 << 7
UFFDIO_REGISTER, UFFDIO_COPY = 0xC020AA00, 0xC028AA03  # _IOWR(0xAA, 0x00 / 0x03, ...)
UFFDIO_REGISTER_MODE_MISSING = 1


def userfaultfd(restorer, ranges, features):
    """A userfaultfd of the process being restored, as an fd of ours, with `ranges` ([start,
    length] pairs) registered for missing pages. Registering acts on the process the
    userfaultfd belongs to, whoever asks: done here, there is no limit to how many ranges."""
    fd = restorer.userfaultfd(features)
    try:
        for start, length in ranges:
            err = uffd_ioctl(fd, UFFDIO_REGISTER, struct.pack("<QQQQ", start, length, UFFDIO_REGISTER_MODE_MISSING, 0))
            if err:
                raise UmigError(f"UFFDIO_REGISTER of [{start:#x}, {start + length:#x}) in pid {restorer.pid} "
                                f"failed: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def uffd_ioctl(fd, request, argument):
    """An ioctl of a userfaultfd whose struct is the bytes `argument`: 0, or the errno."""
    if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.create_string_buffer(argument, len(argument))) < 0:
        return ctypes.get_errno()
    return 0


class _UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


def uffdio_copy(fd, destination, source, length):
    """Place `length` bytes from our address `source` as new pages at `destination` in the
    process of userfaultfd `fd`: (bytes placed, 0 or the errno that stopped it)."""
    arg = _UffdioCopy(dst=destination, src=source, len=length)
    if _libc.ioctl(fd, ctypes.c_ulong(UFFDIO_COPY), ctypes.byref(arg)) == 0:
        return length, 0
    return max(arg.copy, 0), ctypes.get_errno()


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


@contextlib.contextmanager
def buffer_address(data):
    """The address of a contiguous buffer, read-only ones too (a received ZeroMQ frame), held
    while in use: pages go from there into the process without another copy."""
    view = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(data), ctypes.byref(view), 0)
    try:
        yield view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


IOV_MAX = os.sysconf("SC_IOV_MAX")


def _process_vm(call, pid, runs, local):
    """process_vm_readv or process_vm_writev of `runs` in pid, their bytes end to end at our
    address `local`: the bytes moved, up to the first page it could not reach, or -1."""
    remote = struct.pack(f"{2 * len(runs)}Q", *itertools.chain.from_iterable(runs))
    return call(pid, struct.pack("2Q", local, sum(length for _, length in runs)), 1, remote, len(runs), 0)


# Whether a mapping's pages come in long runs or scattered, the image does not say; how much of
# it travels hints at it. A mapping used in part, like a heap or an arena, fills mostly from one
# end: there UFFDIO_COPY, a call per run, saves the zeroed page that process_vm_writev faults in
# before each copy (16 MiB in one block: 4.7 ms against 5.3). One with less than 1/SPARSE_SHARE
# of it carried is mostly reservation (a sparse array, a hash table), its pages likely scattered:
# a call per run costs far more than the zeroing (16 MiB in random pages of 256 MiB: 15.3 ms,
# against 7.6 with up to IOV_MAX runs a call).
SPARSE_SHARE = 16
_THP = "/sys/kernel/mm/transparent_hugepage"


def _thp_modes():
    """How this kernel gives anonymous memory transparent huge pages, one mode per folio size
    (always, madvise or never)."""
    def selected(path):
        try:
            with open(path) as f:
                return re.search(r"\[(\w+)\]", f.read())[1]
        except (OSError, TypeError):
            return "never"
    top = selected(f"{_THP}/enabled")
    sizes = [selected(path) for path in glob.glob(f"{_THP}/hugepages-*/enabled")]
    return {top if mode == "inherit" else mode for mode in sizes} or {top}


def _registered_spans(section):
    """The [start, length] spans that the page writer fills with UFFDIO_COPY: private anonymous
    mappings, but the sparse ones where a write fault brings in one page only. Where it may bring
    in a huge page (transparent huge pages), a vectored write of scattered pages would fill
    megabytes for each (12 s for 2,560 pages of a MADV_HUGEPAGE mapping), UFFDIO_COPY places
    just the page."""
    spans, modes = [], None
    for m in section["mappings"]:
        size = m["end"] - m["start"]
        if m["kind"] not in PRIVATE_ANON_KINDS:
            continue
        if m["pages"] * PAGE_SIZE * SPARSE_SHARE < size:
            modes = _thp_modes() if modes is None else modes
            huge = "always" in modes or ("madvise" in modes and "hg" in m["vmflags"])
            if not huge or "nh" in m["vmflags"]:
                continue
        spans.append([m["start"], size])
    return spans


class PageWriter:
    """Writes pages into the process being restored, from the agent, with one copy each. The
    private anonymous mappings of which much travels are registered with a userfaultfd:
    UFFDIO_COPY puts a page in place where a write would first fault in a zeroed page (half the
    cost of filling memory), one call per run. Pages already there (a later pre-copy round), the
    other memory, and the mappings of which little travels (their pages come scattered, one or a
    few per run, where a call per run costs more than the zeroing) get process_vm_writev, up to
    IOV_MAX runs a call. With UFFD_FEATURE_SIGBUS, a page of registered memory touched before it
    is filled fails whoever touches it (it could only be the restorer) instead of waiting for an
    answer that never comes."""

    def __init__(self, restorer, section):
        self.pid = restorer.pid
        registered = _registered_spans(section)
        self.fd = userfaultfd(restorer, registered, UFFD_FEATURE_SIGBUS)
        self.registered = [(start, start + length) for start, length in registered]

    def write(self, runs, payload):
        """One batch of pages, `runs` (in address order) laid end to end in `payload`."""
        with buffer_address(payload) as base:
            if runs and self._unregistered(runs[0][0], runs[-1][0] + runs[-1][1]):
                self._write_all(runs, base)  # without Python for each run: a sparse mapping's batch has hundreds
                return
            # Consecutive pieces outside registered memory: one stretch of the payload, written together.
            stretch, stretch_source, source = [], base, base
            for start, length in runs:
                end = start + length
                while start < end:  # UFFDIO_COPY takes a range inside one registered mapping only
                    i = bisect.bisect_right(self.registered, (start, 2 ** 64)) - 1
                    if i >= 0 and start < self.registered[i][1]:
                        piece = min(end, self.registered[i][1]) - start
                        self._write_all(stretch, stretch_source)
                        self._copy(start, source, piece)
                        stretch, stretch_source = [], source + piece
                    else:
                        piece = min(end, self.registered[i + 1][0] if i + 1 < len(self.registered) else end) - start
                        stretch.append([start, piece])
                    start += piece
                    source += piece
            self._write_all(stretch, stretch_source)

    def _unregistered(self, start, end):
        """Whether [start, end) has no registered memory."""
        i = bisect.bisect_right(self.registered, (start, 2 ** 64))
        return (i == 0 or self.registered[i - 1][1] <= start) and (i == len(self.registered)
                                                                   or end <= self.registered[i][0])

    def _copy(self, destination, source, length):
        """Pages into registered memory."""
        done = 0
        while done < length:
            placed, err = uffdio_copy(self.fd, destination + done, source + done, length - done)
            if not placed:  # else all of it, or up to a page that stopped it (EAGAIN then, whatever the cause)
                if err not in (errno.EEXIST, errno.ENOENT):  # ENOENT: no longer registered (relayout)
                    raise UmigError(f"UFFDIO_COPY at {destination + done:#x} into pid {self.pid} failed: "
                                    f"{os.strerror(err)}")
                # A page already there: written like any memory, up to the next page that is
                # missing (where the write stops short).
                placed = self._writev([[destination + done, length - done]], source + done)
            done += placed

    def _write_all(self, runs, source):
        """Runs outside the userfaultfd, their bytes end to end from `source`, IOV_MAX runs a
        call. A call that stops short is taken up where it stopped: the next one fails at that
        page, and says where."""
        position, done = 0, 0  # the first run not written yet, and how much of it is
        while position < len(runs):
            chunk = runs[position:position + IOV_MAX]
            chunk[0] = [chunk[0][0] + done, chunk[0][1] - done]
            written = self._writev(chunk, source)
            source += written
            done += written
            while position < len(runs) and done >= runs[position][1]:
                done -= runs[position][1]
                position += 1

    def _writev(self, runs, source):
        """One process_vm_writev of `runs`, their bytes end to end from `source`: how many bytes
        it wrote, up to the first page it could not write; not even one is an error."""
        written = _process_vm(_libc.process_vm_writev, self.pid, runs, source)
        if written <= 0:
            err = ctypes.get_errno() if written < 0 else errno.EFAULT
            raise UmigError(f"writing {runs[0][1]} bytes at {runs[0][0]:#x} into pid {self.pid} failed: "
                            f"{os.strerror(err)}")
        return written

    def close(self):
        """Unregisters the memory: the restorer may touch its pages again (the rseq area)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def finish(restorer, section):
    """Final protections and anonymous mapping names, once every page is in."""
    for m in section["mappings"]:
        if m["kind"] in ("vdso", "vsyscall"):
            continue
        if m["prot"] != _filling_prot(m):
            restorer.protect(m["start"], m["end"] - m["start"], m["prot"])
        if m["path"].startswith("[anon:"):
            restorer.vma_name(m["start"], m["end"] - m["start"], m["path"][len("[anon:"):-1])


def describe(section):
    lines = [f"memory: {len(section['mappings'])} mappings, "
             f"{sum(m['pages'] for m in section['mappings'])} pages carried"]
    for m in section["mappings"]:
        size = m["end"] - m["start"]
        lines.append(f"  {m['start']:012x}-{m['end']:012x} {_perms(m['prot'], m['shared'])} "
                     f"{size // 1024:>9} KiB {m['pages']:>8} pages  {m['kind']:<11} {m['path']}")
    return lines
