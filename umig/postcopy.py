"""Post-copy ("lazy") migration: the process runs on the target before its memory has arrived.

The source sends the state, the stack and the pages userfaultfd cannot fetch later (copy-on-write
pages of private file mappings, shared memory), and the pages the process wrote while the target
prepared (its working set, found with the pre-copy write tracker, umig/precopy.py: each would
otherwise be a fault right after the resume), then the process resumes on the target. Its heap
and anonymous mappings are registered with a userfaultfd the restorer creates and hands to the
agent (pidfd_getfd): a page the process touches is asked of the source at once, while the source
streams all the others in the background. The source is released only when every
page has arrived.

Until then the agent stays the process's tracer (with PTRACE_O_EXITKILL): an agent that dies takes
the process with it, rather than letting the kernel fill its missing pages with zeros. A child the
process forks meanwhile gets a userfaultfd of its own from the kernel (UFFD_EVENT_FORK), and the
pages still missing at the fork come to it too; a process that executes another program or ends
needs none any more. A source
lost during post-copy cannot be recovered: the agent kills the process and says so; the source
side, which still holds the original frozen, resumes it from the moment it was frozen.
"""
import bisect
import contextlib
import copy
import errno
import os
import signal
import struct
import threading
import time

import zmq

from umig import image, precopy, procfs
from umig.errors import UmigError
from umig.ptrace import (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_O_EXITKILL, PTRACE_O_TRACEFORK,
                         PTRACE_O_TRACEVFORK, TraceError, Tracee, TraceeExited)
from umig.procfs import PAGE_SIZE
from umig.state import memory
from umig.transport import PING_INTERVAL

# The stack is not among them: it is what the process touches first (its registers point there),
# and it is small; its faults would come one after another right at the resume.
LAZY_KINDS = ("anon", "heap")
PREFETCH_PAGES = 16  # a fault fetches its neighbours too: processes touch memory in runs
# What a process reads right after its resume lies near what it wrote before, though not next to
# it: a CPython process faulted on pages 17 to 780 pages from any it had written, in its heap and
# obmalloc arenas (mappings of 300 to 900 pages), eight faults after every resume. Such mappings
# go ahead whole; larger ones hold bulk data, which may well wait for the background stream.
NEIGHBOURHOOD_LIMIT = 4 << 20
# Background records sent ahead of the target's "placed", and their size: an answer to a fault
# queues behind at most a megabyte (well under a millisecond), not behind the socket buffers.
STREAM_WINDOW = 4
BACKGROUND_BATCH = 256 << 10
# Right after the resume the process touches its working set, one fault after another, each
# answer queued behind the background records in flight (a dozen faults of a Python interpreter
# took 15 ms so). The stream waits until no fault has come for FAULT_QUIET, for at most
# RESUME_BURST after the resume: a process that scans its memory needs the stream.
FAULT_QUIET = 0.002
RESUME_BURST = 0.05
# While pages are missing the source streams without pause: this long a silence means it is gone.
SOURCE_SILENCE = 10.0

UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = (
    0x12, 0x13, 0x14, 0x15, 0x16)
UFFDIO_ZEROPAGE = 0xC020AA04
UFFD_FEATURE_EVENT_FORK, UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP = (
    1 << 1, 1 << 2, 1 << 3, 1 << 6)
# The agent must learn of ranges the process drops or moves before their pages come, and of the
# children it forks: without their own userfaultfd, the kernel would fill their copies of the
# missing pages with zeros.
LAZY_FEATURES = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP
# The tracker is disarmed in the final freeze, which unprotects every page it watched: about 8 ms
# per GiB here. Heaps larger than this are not watched for a working set.
WORKING_SET_WATCH_LIMIT = 64 << 20
_MSG = struct.Struct("<BBHI24s")


def split(state, runs, working_set=()):
    """(eager, lazy) page runs: userfaultfd serves missing pages of anonymous private memory only,
    and not those the kernel writes while the restorer still runs (the rseq area, on registration):
    no one would answer that fault. Pages of the `working_set` runs go eagerly too, and mappings
    no larger than a fault's prefetch: one or two faults would bring all of them (a CPython
    process has a few, one of them touched first thing after every resume), and eager pages go
    ahead while the process still runs."""
    spans = [span for span in memory.spans(state["memory"], LAZY_KINDS) if span[1] > PREFETCH_PAGES * PAGE_SIZE]
    lazy_spans = memory.intersect(spans, memory.complement(working_set, 0, 2 ** 64))
    if state["rseq"]:
        first = state["rseq"]["address"] & ~(PAGE_SIZE - 1)
        last = (state["rseq"]["address"] + state["rseq"]["length"] - 1) & ~(PAGE_SIZE - 1)
        lazy_spans = memory.intersect(lazy_spans, memory.complement([[first, last + PAGE_SIZE - first]], 0, 2 ** 64))
    lazy = memory.intersect(runs, lazy_spans)
    eager = memory.intersect(runs, memory.complement(lazy, 0, 2 ** 64))
    return eager, lazy


# --- source ------------------------------------------------------------------------------------------

def neighbourhoods(state, runs, written):
    """The `runs` of the anonymous mappings of at most NEIGHBOURHOOD_LIMIT that hold a page of
    `written`: the pages the process is likely to read first once it runs on the target."""
    spans = [span for span in memory.spans(state["memory"], LAZY_KINDS)
             if span[1] <= NEIGHBOURHOOD_LIMIT and memory.intersect(written, [span])]
    return memory.intersect(runs, spans)


def tracked_kinds(section):
    """The mappings the write tracker watches in a lazy migration of this memory section: every
    kind whose pages go before the resume (so that they can go while the process still runs,
    then only what it writes since), and the lazy kinds to learn the working set, where that is
    cheap."""
    eager = tuple(kind for kind in precopy.TRACKED_KINDS if kind not in LAZY_KINDS)
    heaps = sum(m["pages"] for m in section["mappings"] if m["kind"] in LAZY_KINDS) * PAGE_SIZE
    return eager + LAZY_KINDS if heaps <= WORKING_SET_WATCH_LIMIT else eager


def serve(pid, writer, connection, lazy_runs):
    """Stream the lazy pages while answering the target's faults first; returns, when the target
    has every page, how many page faults of the process it handled meanwhile."""
    background = memory.read_batches(pid, lazy_runs, batch_bytes=BACKGROUND_BATCH, ring=writer.holds + 1)
    streaming = True
    in_flight = 0  # page records sent and not yet placed by the target
    resumed = last_fetch = time.monotonic()
    while True:
        sending = streaming and in_flight < STREAM_WINDOW
        hold = min(resumed + RESUME_BURST, last_fetch + FAULT_QUIET) - time.monotonic()
        message = connection.poll_control(max(hold, 0) if sending else connection.timeout)
        if message is None:
            if not sending:
                raise UmigError(f"the agent at {connection.endpoint} fell silent during post-copy")
            if hold > 0:
                continue
            batch = next(background, None)
            if batch is None:
                writer.end()
                streaming = False
            else:
                writer.write(image.Record("pages", {"runs": batch[0]}, batch[1]))
                in_flight += 1
            continue
        kind, meta = message
        if kind == "complete":
            return meta.get("faults")
        if kind == "placed":
            in_flight -= 1
            continue
        if kind != "fetch":
            raise UmigError(f"the agent sent {kind!r} during post-copy")
        if not streaming:
            continue  # every page is on its way already: the stream has ended
        last_fetch = time.monotonic()
        wanted = memory.intersect(lazy_runs, [[meta["address"], PREFETCH_PAGES * PAGE_SIZE]])
        for batch_runs, buffer in memory.read_batches(pid, wanted, ring=writer.holds + 1):
            writer.write(image.Record("pages", {"runs": batch_runs}, buffer))
            in_flight += 1


# --- target ------------------------------------------------------------------------------------------

class PendingPages:
    """The lazy pages that have not arrived yet, as one bitmap per run (by source address)."""

    def __init__(self, runs):
        self.starts = [start for start, _ in runs]
        self.runs = runs
        self.bits = [bytearray(b"\1") * (length // PAGE_SIZE) for _, length in runs]
        self.count = sum(length for _, length in runs) // PAGE_SIZE

    def _where(self, address):
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.starts[i] + self.runs[i][1]:
            return i, (address - self.starts[i]) // PAGE_SIZE
        return None

    def missing(self, address):
        where = self._where(address)
        return where is not None and self.bits[where[0]][where[1]] == 1

    def take(self, address):
        """Mark a page arrived (or no longer wanted); whether it was still missing."""
        where = self._where(address)
        if where is None or not self.bits[where[0]][where[1]]:
            return False
        self.bits[where[0]][where[1]] = 0
        self.count -= 1
        return True

    def copy(self):
        """An independent copy: a child forked meanwhile misses what its parent missed."""
        twin = copy.copy(self)
        twin.bits = [bytearray(bits) for bits in self.bits]
        return twin


class Filling:
    """One memory being filled through a userfaultfd: the restored process's, or that of a child
    it forked meanwhile (the kernel hands over the child's copy registered alike, with the same
    pages missing). Its missing pages, by source address, and where it moved memory (mremap)."""

    def __init__(self, fd, pending, remaps=()):
        self.fd = fd
        self.pending = pending
        self.remaps = list(remaps)  # (from, to, length) in the order the process made them
        self.gone = False  # the process left it (execve, or its end): UFFDIO_* answer ESRCH

    def fork(self, fd):
        """The child's copy, as this memory is at the fork."""
        return Filling(fd, self.pending.copy(), self.remaps)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def to_target(self, address):
        for frm, to, length in self.remaps:
            if frm <= address < frm + length:
                address += to - frm
        return address

    def to_source(self, address):
        for frm, to, length in reversed(self.remaps):
            if to <= address < to + length:
                address += frm - to
        return address

    def leave(self):
        """No page still to come has anywhere to go here any more (its pending pages stay as they
        were: a child's fork, read before, is taken over from them)."""
        self.gone = True
        self.close()


# Followed while pages are still coming: the kernel attaches a forked child to the agent, with
# PTRACE_O_EXITKILL too (an agent that dies takes it along, rather than leaving it zeros), and
# says its pid (a move that fails must kill it: its memory cannot be whole either).
FAMILY_OPTIONS = PTRACE_O_EXITKILL | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK


class Pager:
    """The agent's side of post-copy for one process: the memories being filled (its own, and
    those of children it forks meanwhile), the family of processes traced meanwhile, and the
    pages asked of the source."""

    def __init__(self, restorer, section, lazy_runs):
        self.requested = set()
        self.faults = 0
        self.forks = 0
        self.family = []  # ptrace.Tracee of the process and the children it forks, while traced
        self._zero_later = []  # faults on pages with nothing to come, met while the layout changed
        # last: nothing fails after
        fd = memory.userfaultfd(restorer, memory.spans(section, LAZY_KINDS), LAZY_FEATURES)
        self.process = Filling(fd, PendingPages(lazy_runs))
        self.fillings = [self.process]
        self.poller = zmq.Poller()
        self.poller.register(fd, zmq.POLLIN)

    @property
    def missing(self):
        return sum(filling.pending.count for filling in self.fillings if not filling.gone)

    @property
    def memory_gone(self):
        """Whether the restored process has left the memory being filled (execve, or its end)."""
        return self.process.gone

    def close(self):
        for filling in self.fillings:
            filling.close()

    def place(self, runs, payload, fetch):
        """Copy the pages of a record that are still missing into each memory being filled,
        whole stretches at a time; pages one already has or no longer maps are skipped. A child
        forked meanwhile (its event read while a copy waits) gets the record's pages too."""
        with memory.buffer_address(payload) as base:
            i = 0
            while i < len(self.fillings):
                filling, offset = self.fillings[i], 0
                i += 1
                for start, length in runs:
                    page = start
                    while page < start + length and not filling.gone:
                        if not filling.pending.missing(page):
                            page += PAGE_SIZE
                            continue
                        end = page
                        while end < start + length and filling.pending.missing(end):
                            end += PAGE_SIZE
                        page = self._copy(filling, page, end, base + offset - start, fetch)
                    offset += length

    def _copy(self, filling, page, end, source_base, fetch):
        """UFFDIO_COPY of the missing pages [page, end) (source addresses); returns where the
        caller goes on from. Pages count as arrived only once the kernel says they did."""
        target = filling.to_target(page)
        # One ioctl per stretch, unless the process moved part of it (mremap) meanwhile.
        whole = filling.to_target(end - PAGE_SIZE) == target + (end - PAGE_SIZE - page)
        length = end - page if whole else PAGE_SIZE
        done, err = memory.uffdio_copy(filling.fd, target, source_base + page, length)
        for arrived in range(page, page + done, PAGE_SIZE):
            filling.pending.take(arrived)
        if err == 0 or done:
            return page + done
        if err == errno.EAGAIN:  # the layout is changing: learn how from its events, then retry
            self.events(fetch)
            return page
        if err in (errno.EEXIST, errno.ENOENT):
            if length > PAGE_SIZE:  # perhaps only part of the stretch: page by page
                return self._copy(filling, page, page + PAGE_SIZE, source_base, fetch)
            filling.pending.take(page)  # already there, or no longer mapped: nothing to bring
            return page + PAGE_SIZE
        if err == errno.ESRCH:
            self._leave(filling)
            return end
        raise UmigError(f"UFFDIO_COPY at {target:#x} failed: {os.strerror(err)}")

    def _leave(self, filling):
        """The process left this memory: it executed another program, or is ending. Serving
        ends once every memory is whole or left; the rest of the stream is let go then (the agent
        drops it as the tail of a finished migration)."""
        self.poller.unregister(filling.fd)
        filling.leave()

    def events(self, fetch):
        """Handle what the processes did: faults are fetched (or zero-filled where the source had
        no page), dropped and moved ranges noted, children's copies taken over."""
        for filling in self.fillings:  # a child's, appended meanwhile, is read in this pass too
            while not filling.gone:
                try:
                    raw = os.read(filling.fd, _MSG.size * 64)
                except BlockingIOError:
                    break
                for i in range(0, len(raw), _MSG.size):
                    event, _, _, _, arg = _MSG.unpack_from(raw, i)
                    # Read, a fork's event has let the child go on: it is taken over even if
                    # its parent left this memory as the batch was handled.
                    if not filling.gone or event == UFFD_EVENT_FORK:
                        self._event(filling, event, arg, fetch)
        retry, self._zero_later = self._zero_later, []
        for filling, address in retry:
            self._zero(filling, address)

    def _event(self, filling, event, arg, fetch):
        if event == UFFD_EVENT_PAGEFAULT:
            self._fault(filling, struct.unpack_from("<QQ", arg)[1] & ~(PAGE_SIZE - 1), fetch)
        elif event == UFFD_EVENT_FORK:
            self.forks += 1
            child = filling.fork(struct.unpack_from("<I", arg)[0])
            self.fillings.append(child)
            self.poller.register(child.fd, zmq.POLLIN)
        elif event == UFFD_EVENT_REMAP:
            filling.remaps.append(struct.unpack_from("<QQQ", arg))
        elif event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
            start, end = struct.unpack_from("<QQ", arg)
            for page in range(start, end, PAGE_SIZE):
                filling.pending.take(filling.to_source(page))

    def _fault(self, filling, address, fetch):
        self.faults += 1
        source = filling.to_source(address)
        if filling.pending.missing(source):
            if source not in self.requested:
                self.requested.add(source)
                fetch(source)
            return
        self._zero(filling, address)

    def _zero(self, filling, address):
        """A zero page where the source had none (the faulting process waits for it)."""
        if filling.gone:
            return
        # struct uffdio_zeropage: the range, a mode, and the kernel's result after them.
        err = memory.uffd_ioctl(filling.fd, UFFDIO_ZEROPAGE, struct.pack("<QQQq", address, PAGE_SIZE, 0, 0))
        if err == errno.EAGAIN:  # the layout is changing (a fork, a move): after its events
            self._zero_later.append((filling, address))
        elif err == errno.ESRCH:
            self._leave(filling)
        elif err not in (0, errno.EEXIST, errno.ENOENT):
            raise UmigError(f"UFFDIO_ZEROPAGE at {address:#x} failed: {os.strerror(err)}")

    def _look_after(self, tracee):
        """Pass on every stop of the family's that is waiting (never blocks). Returns the end of
        the process (`tracee`) if it has just ended."""
        ended = None
        for member in list(self.family):
            stop = member.poll_stop()
            if stop is None:
                continue
            if stop.stopped:
                self._follow(member, stop)
                continue
            self.family.remove(member)
            if member is tracee:
                ended = stop
                if not self.process.gone:
                    self._leave(self.process)
        return ended

    def _follow(self, member, stop):
        """Pass a stop of the process or a child of its on: forks add to the family."""
        if stop.group_stop:
            member.listen()  # stopped by job control: it stays so (detach keeps it too)
            return
        self._adopt(member, stop)
        member.cont(stop.signo if stop.kind == "signal" else 0)

    def _adopt(self, member, stop):
        """The child a fork stop of `member` tells of, now traced too (or None)."""
        if stop.kind == "event" and stop.event in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK):
            child = Tracee.adopted(member.event_message())
            self.family.append(child)
            return child
        return None

    def run(self, session, records, tracee):
        """Serve the process (and the children it forks meanwhile) until every page is in,
        passing their signals on meanwhile. Returns the process's end if it ended first (its move
        is complete then: it ran to its end there)."""
        self.family = [tracee]
        self.poller.register(session.socket, zmq.POLLIN)
        last_heard = last_ping = time.monotonic()
        ended = None

        def from_source(call, *args, **meta):
            """Whatever goes wrong between us and the source now is the unrecoverable case."""
            try:
                return call(*args, **meta)
            except UmigError as e:
                raise UmigError(f"the source was lost during post-copy ({e}) with {self.missing} pages "
                                "still there: the process cannot go on") from None

        def fetch(address):
            from_source(session.send, "fetch", address=address)

        def silent():
            raise UmigError(f"it fell silent for {SOURCE_SILENCE:g} s")

        def nothing_to_fill():
            # Ended, or executed another program: kept traced until the rest had come, the new
            # program would die with a source lost meanwhile, for pages it does not need. A child
            # it forked may still need them, though.
            self.fillings = [filling for filling in self.fillings if not filling.gone]
            return not self.fillings

        while True:
            self.events(fetch)
            ended = self._look_after(tracee) or ended
            if nothing_to_fill():
                return ended
            while from_source(session.ready):
                # Faults first, between every record: a process waiting on one page must not wait
                # for the whole background stream that is queued before its answer; nor a fork
                # or a signal of the family's (each holds its process in a ptrace-stop).
                self.events(fetch)
                ended = self._look_after(tracee) or ended
                last_heard = time.monotonic()
                record = from_source(next, records)
                if record.kind == "pages":
                    self.place(record.meta["runs"], record.payload, fetch)
                    if nothing_to_fill():
                        break
                    from_source(session.send, "placed")
                elif record.kind == "end":
                    if self.missing:
                        raise UmigError(f"the source ended its stream with {self.missing} pages missing")
                    self.close()
                    return ended
            silence = time.monotonic() - last_heard
            if silence > SOURCE_SILENCE:
                from_source(silent)
            if silence > PING_INTERVAL and time.monotonic() - last_ping > PING_INTERVAL:
                last_ping = time.monotonic()
                from_source(session.check_source)
            self.poller.poll(50)

    def release(self, tracee):
        """Every page is in (or nothing needs one): let the family go on untraced. Returns the
        end of the process (`tracee`) if it ended as the last pages came. The youngest go first:
        a parent in vfork() stops only once its child has executed or ended; a child forked on
        the way goes at once."""
        def forked_meanwhile(member):
            return lambda stop: self._release(self._adopt(member, stop))

        ended = None
        for member in reversed(list(self.family)):
            try:
                member.detach(seen=forked_meanwhile(member))
            except TraceeExited as e:
                if member is tracee:
                    ended = e.stop
            except TraceError as e:
                if e.errno != errno.ESRCH:  # killed between its stop and the detach: gone
                    raise
        # A child whose parent was killed before its fork was reported is traced all the same.
        for pid in procfs.traced_by(threading.get_native_id()):
            self._release(Tracee.adopted(pid))
        return ended

    @staticmethod
    def _release(child):
        if child is not None:
            with contextlib.suppress(TraceError):
                child.detach()

    def kill_children(self, tracee):
        """The move failed: the children the process (`tracee`) forked meanwhile, whose memory
        cannot be whole either, go with it. All of them are traced by this thread until the move
        completes, even one whose fork was not reported yet; the process goes first, and the
        look is taken again until none is left that could still fork."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(tracee.pid, signal.SIGKILL)
        for _ in range(100):  # each round kills what the previous one could still have forked
            children = [pid for pid in procfs.traced_by(threading.get_native_id()) if pid != tracee.pid]
            if not children:
                return
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in children:
                Tracee.adopted(pid).kill()
