"""Pre-copy ("live") migration: copy memory while the process runs, then freeze it briefly for
what it wrote meanwhile.

Soft-dirty bits are not available on every kernel (not here): writes are found with userfaultfd
write-protection in asynchronous mode. A userfaultfd is created inside the process (injected
syscalls), every mapping whose pages travel is registered with it, and the PAGEMAP_SCAN ioctl of
/proc/PID/pagemap then reports the pages written since the last scan and write-protects them again,
in one atomic step, from outside and without faults reaching anyone.

Rounds (each one reads and sends, while the process runs, what the previous one found written) stop
when the next round's pages would be sent within FINAL_COPY_BUDGET at the rate just measured, when
a round no longer shrinks the set (the process writes as fast as we copy), or after MAX_ROUNDS.
Then, once the target has placed all it was sent, the process is frozen, the last written pages
are taken, and the final state goes out with those pages and the layout changes since the first
state. The userfaultfd stays in the process
through that freeze (closing it write-unprotects every page): a released source dies with it, a
thawed one has it closed first.
"""
import os
import struct
import time

import xxhash

from umig import procfs
from umig.errors import UmigError
from umig.ptrace import Buffer, Call
from umig.restorer import take_fd
from umig.state import memory

SYS_IOCTL, SYS_USERFAULTFD, SYS_FCNTL, SYS_CLOSE = 16, 323, 72, 3
O_CLOEXEC, O_NONBLOCK, UFFD_USER_MODE_ONLY = 0o2000000, 0o4000, 1
UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED, UFFD_FEATURE_WP_ASYNC = 1 << 13, 1 << 15
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
F_DUPFD_CLOEXEC = 1030
PM_SCAN_WP_MATCHING, PM_SCAN_CHECK_WPASYNC = 1 << 0, 1 << 1
PAGE_IS_WRITTEN = 1 << 1
TRACKED_KINDS = ("anon", "heap", "stack", "file", "shared_anon")

MAX_ROUNDS = 10
FINAL_COPY_BUDGET = 0.005  # seconds the last, frozen copy may take at the measured rate
SHRINK_FACTOR = 0.9        # a round must leave less than this share of the previous one's pages


def tracker(frozen, section, method, notice):
    """The write tracker for `method` ("userfaultfd", falling back to page hashes where the kernel
    lacks async write-protect and saying so through `notice`, or "hashes"), started."""
    if method == "userfaultfd":
        try:
            armed = WriteTracker(frozen, section)
        except UmigError as e:
            notice(f"{e}; comparing page hashes instead")
        else:
            try:
                armed.start()  # stopped: every page is protected before pre-copy reads any
            except UmigError:
                armed.disarm()
                raise
            return armed
    return HashTracker(frozen, section)


class WriteTracker:
    """A userfaultfd in async write-protect mode inside the process, and the scans that read it."""
    method = "userfaultfd"

    def __init__(self, frozen, section, kinds=TRACKED_KINDS):
        """Arm it for the mappings of these kinds: the process must be stopped (injected syscalls)."""
        self.frozen = frozen
        self.mappings = section["mappings"]
        self.tracked = [m for m in section["mappings"] if m["kind"] in kinds]
        with frozen.inside():
            fd = frozen.syscall_checked("userfaultfd", SYS_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
            # Out of the way: the process's next open() should get the number it would have got.
            limit = int(procfs.read_text(frozen.pid, "limits").split("Max open files")[1].split()[0])
            high = frozen.session.syscall(SYS_FCNTL, fd, F_DUPFD_CLOEXEC, limit - 1)
            if high >= 0:
                frozen.syscall_checked("close", SYS_CLOSE, fd)
                fd = high
            self.fd = fd
            self._inode = os.stat(procfs.proc_path(frozen.pid, f"fd/{fd}")).st_ino  # each its own
            calls = [Call("UFFDIO_API (write-protect, async)", SYS_IOCTL, fd, UFFDIO_API,
                          Buffer(data=struct.pack("<QQQ", UFFD_API, UFFD_FEATURE_WP_ASYNC, 0)))]
            calls += [Call(f"UFFDIO_REGISTER of mappings {start:x}-{end:x}", SYS_IOCTL, fd, memory.UFFDIO_REGISTER,
                           Buffer(data=struct.pack("<QQQQ", start, end - start, UFFDIO_REGISTER_MODE_WP, 0)))
                      for start, end in _neighbourhoods(self.mappings, self.tracked)]
            frozen.run_batch(calls)  # each ioctl alone cost two wake-ups of the process
            failed = next((call for call in calls if call.result < 0), None)
            if failed:
                frozen.syscall_checked("close of the userfaultfd", SYS_CLOSE, fd)
                raise UmigError(f"{failed.name} inside pid {frozen.pid} failed: {os.strerror(-failed.result)} "
                                "(live migration needs userfaultfd write-protect in async mode, Linux 6.7 or later)")
        self.lost = set()
        self._pagemap = os.open(procfs.proc_path(frozen.pid, "pagemap"), os.O_RDONLY)

    def start(self):
        """Write-protect every page: from here on, writes are what it reports (the process may
        run meanwhile: a page it writes then may be reported or not)."""
        self.written()

    def written(self, again=True):
        """Runs of pages written since the last call, write-protected again as they are reported
        (unless not `again`: then only looked at, and the next call reports them too)."""
        if not self._outlived():
            try:
                return self._written_since(again)
            except UmigError:
                if not self._outlived():
                    raise
        # It executed another program (before the scans, or during them: it may run meanwhile).
        # What was watched is gone; whatever is there now travels whole in the frozen copy.
        self.lost.update(memory.same_mapping(m) for m in self.tracked)
        return []

    def _written_since(self, again):
        runs = []
        watched = [m for m in self.tracked if memory.same_mapping(m) not in self.lost]
        # One scan for each series of watched mappings with nothing else between them, as they
        # were registered (a scan for each mapping cost most of a millisecond of the final freeze
        # of a CPython process); one that fails has a mapping that changed: each is asked alone.
        for start, end in _neighbourhoods(self.mappings, watched):
            try:
                runs.extend(self._written_between(start, end, again))
                continue
            except UmigError:
                pass
            for m in watched:
                if start <= m["start"] < end:
                    try:
                        runs.extend(self._written_between(m["start"], m["end"], again))
                    except UmigError:
                        # Unmapped or replaced since it was registered: no longer tracked, so
                        # all of whatever is there now travels in the frozen copy.
                        self.lost.add(memory.same_mapping(m))
        # A copied page the process drops from a private file mapping leaves a write-protect
        # marker, which PAGEMAP_SCAN reports as swapped and not written: the copy the target holds
        # is stale there (the file's page is back). Swapped pages of file mappings go again, read
        # as they are now; one scan from the first to the last (one a mapping cost a millisecond
        # in a process with many libraries).
        files = [[m["start"], m["end"] - m["start"]] for m in self.tracked
                 if m["kind"] == "file" and memory.same_mapping(m) not in self.lost]
        if files:
            swapped = [[start, end - start] for start, end, _ in memory.scan(
                self._pagemap, files[0][0], files[-1][0] + files[-1][1], memory.PAGE_IS_SWAPPED, memory.PAGE_IS_SWAPPED)]
            runs = memory.union(runs, memory.intersect(swapped, files))
        return runs

    def _written_between(self, start, end, again):
        # Only pages that exist: protecting holes would fill the page tables of a sparse mapping
        # with markers. A mapping there that is not registered (new, or replaced) fails the scan.
        return [[run_start, run_end - run_start] for run_start, run_end, _ in memory.scan(
            self._pagemap, start, end, memory.PAGE_IS_PRESENT | memory.PAGE_IS_SWAPPED, PAGE_IS_WRITTEN,
            required=PAGE_IS_WRITTEN, flags=PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if again else 0))]

    def sent(self, runs, buffer):
        """Nothing to note: the kernel keeps the record."""

    @property
    def fds(self):
        """Its descriptors in the process, which are umig's and do not travel: none once the
        process has left it (the number may be a new program's)."""
        return () if self._outlived() else (self.fd,)

    def _outlived(self):
        """Whether the process has left it: executed another program (its userfaultfd,
        close-on-exec, went with the old memory), exited, or closed the descriptor itself. Our
        pagemap descriptor holds the memory it watched, and reads nothing once no process uses
        that memory; but another reader of it (ps reading the command line) may hold it a moment
        longer, while the number no longer names this userfaultfd from the exec on."""
        try:
            ours = os.stat(procfs.proc_path(self.frozen.pid, f"fd/{self.fd}")).st_ino == self._inode
        except OSError:
            ours = False
        return not ours or os.pread(self._pagemap, 8, 0) == b""

    def disarm(self):
        """Close the userfaultfd inside the (stopped) process: its mappings are unregistered."""
        fds = self.fds
        os.close(self._pagemap)
        if fds:
            with self.frozen.inside():
                self.frozen.syscall_checked("close of the userfaultfd", SYS_CLOSE, self.fd)

    def forget(self):
        """The process has ended, its userfaultfd with it: only our side to close."""
        os.close(self._pagemap)

    def abandon(self, pidfd):
        """Undo its registrations from outside, through a copy of its userfaultfd taken with
        the process's `pidfd`: the process cannot be stopped to close it (another tracer holds
        it). The descriptor stays in the process, registered to nothing. One that has exited
        took it along."""
        try:
            fd = take_fd(self.frozen.pid, self.fd, pidfd)
        except UmigError:
            return self.forget()
        try:
            # Each mapping registered now, one by one: a range fails whole if the process has
            # mapped into it since what userfaultfd does not take (a shared file, between two
            # registered mappings or over part of one), and registered mappings may have grown.
            series = _neighbourhoods(self.mappings, self.tracked)
            entries, vmflags = procfs.parse_smaps(procfs.read_text(self.frozen.pid, "smaps"))
            for entry in entries:
                if "uw" in vmflags[entry.start] and any(entry.start < end and start < entry.end
                                                        for start, end in series):
                    # Unregistering acts on the process the userfaultfd belongs to, whoever asks.
                    memory.uffd_ioctl(fd, UFFDIO_UNREGISTER,
                                      struct.pack("<QQ", entry.start, entry.end - entry.start))
        except UmigError:
            pass  # it has exited meanwhile, its userfaultfd with it
        finally:
            os.close(fd)
            self.forget()


class HashTracker:
    """Without userfaultfd write-protect: a hash of every page as it was sent, and each round
    re-reads every present page to find those whose hash changed (it costs a read of all memory
    per round, and nothing inside the process)."""
    method = "page hashes"

    def __init__(self, frozen, section):
        self.pid = frozen.pid
        self.tracked = [m for m in section["mappings"] if m["kind"] in TRACKED_KINDS]
        self.lost = set()  # a changed mapping shows as changed pages, or in the final layout
        self.hashes = {}

    def sent(self, runs, buffer):
        view, offset = memoryview(buffer), 0
        for start, length in runs:
            for page in range(0, length, procfs.PAGE_SIZE):
                self.hashes[start + page] = xxhash.xxh3_64_intdigest(view[offset + page:offset + page + procfs.PAGE_SIZE])
            offset += length

    def written(self):
        present = memory.present_runs(self.pid, self.tracked)
        changed = []
        for runs, buffer in memory.read_batches(self.pid, present, tolerant=True):
            view, offset = memoryview(buffer), 0
            for start, length in runs:
                for page in range(start, start + length, procfs.PAGE_SIZE):
                    at = offset + page - start
                    if self.hashes.get(page) != xxhash.xxh3_64_intdigest(view[at:at + procfs.PAGE_SIZE]):
                        memory.add_run(changed, page, page + procfs.PAGE_SIZE)
                offset += length
        return changed

    fds = ()  # nothing was put inside the process

    def disarm(self):
        """Nothing was put inside the process."""

    forget = disarm


def _neighbourhoods(mappings, tracked):
    """(start, end) of each series of `tracked` mappings with no other mapping between them. One
    UFFDIO_REGISTER takes a whole series, holes included: one injected ioctl per mapping cost
    several milliseconds of the first freeze in a process with a hundred mappings."""
    tracked = {m["start"] for m in tracked}
    series = []
    extend = False
    for m in mappings:
        if m["start"] not in tracked:
            extend = False
        elif extend:
            series[-1][1] = m["end"]
        else:
            series.append([m["start"], m["end"]])
            extend = True
    return series


def _send_runs(write_pages, pid, runs):
    started = time.monotonic()
    sent = write_pages(pid, runs)
    return sent, time.monotonic() - started


def copy_rounds(frozen, tracker, runs, write_pages, settle):
    """Stream memory while the process runs, round after round; returns, with the process frozen
    again, the pages written since the last round, the rounds' statistics and why they ended.
    settle() returns once the target has placed every page sent: the freeze then has the
    machine to itself, not a target still busy with the last round."""
    rounds = []
    sent, elapsed = _send_runs(write_pages, frozen.pid, runs)
    rounds.append({"pages": sent // procfs.PAGE_SIZE, "seconds": round(elapsed, 6)})
    while True:
        written = tracker.written()
        size = sum(length for _, length in written)
        rate = max(sent, procfs.PAGE_SIZE) / max(elapsed, 1e-6)
        previous = rounds[-1]["pages"] * procfs.PAGE_SIZE
        reason = ("small enough" if size / rate <= FINAL_COPY_BUDGET else
                  "not shrinking" if size >= SHRINK_FACTOR * previous else
                  "round limit" if len(rounds) >= MAX_ROUNDS else None)
        if reason:
            settle()
            frozen.stop()
            return memory.union(written, tracker.written()), rounds, reason
        sent, elapsed = _send_runs(write_pages, frozen.pid, written)
        rounds.append({"pages": sent // procfs.PAGE_SIZE, "seconds": round(elapsed, 6)})


def final_pages(first, final, written, final_runs, tracked, lost, sent):
    """What the frozen copy must send, and what the target must drop: in mappings unchanged since
    the first state, tracked and not `lost` by the tracker, the pages written since the last
    round; in the others, all their pages. And in every mapping the target keeps (the same as in
    the first state: memory.relayout keeps those, whatever the tracker says), every page `sent`
    before that the process no longer has; pages never sent are still as the target made them
    (asking for the holes of a sparse mapping cost thousands of steps)."""
    # Shared memory is sent whole: others may write it, and a page the kernel reclaims from this
    # process's page tables takes its write-protect record along.
    built = {memory.same_mapping(m) for m in first["mappings"]}
    unchanged = (built & {memory.same_mapping(m) for m in tracked if m["kind"] != "shared_anon"}) - lost
    tracked_spans, other_spans, kept_spans = [], [], []
    for m in final["mappings"]:
        span = [m["start"], m["end"] - m["start"]]
        (tracked_spans if memory.same_mapping(m) in unchanged else other_spans).append(span)
        if memory.same_mapping(m) in built:
            kept_spans.append(span)
    # Whole lists at once, each step linear in their lengths: a loop over mappings, each
    # intersected with all runs, cost milliseconds of the freeze in a process with many mappings.
    # The two parts are disjoint, and a run never spans two mappings: sorting merges them.
    send = sorted(memory.intersect(memory.intersect(final_runs, tracked_spans), written)
                  + memory.intersect(final_runs, other_spans))
    discard = memory.intersect(memory.intersect(kept_spans, memory.complement(final_runs, 0, 2 ** 64)), sent)
    return send, discard
