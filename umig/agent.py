"""The node daemon: receives migrations on a ZeroMQ ROUTER socket, restores them, reaps what it
restored, and logs one line per event. One migration at a time; others are told it is busy."""
import ctypes
import gc
import os
import signal
import sys
import time
import traceback

import zmq

from umig import image
from umig.errors import UmigError
from umig.restore import restore
from umig.state.signals import describe_end
from umig.transport import Session, control, is_loopback, parse_control

DEFAULT_LISTEN = "tcp://127.0.0.1:7707"
SESSION_TIMEOUT = 30.0


class Agent:
    def __init__(self, listen=DEFAULT_LISTEN, name=None, out=sys.stdout):
        self.listen = listen
        self.name = name or os.uname().nodename
        self.out = out
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Sending to a peer that has gone fails at once: how a migration notices its source died.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.RCVHWM, 16)
        try:
            self.socket.bind(listen)
        except zmq.ZMQError as e:
            raise UmigError(f"cannot listen on {listen}: {e}") from None
        self.restored = {}  # pid to wait for -> the restored process's PID as shown
        # Hooks for the scheduler (umig/balance.py), which lives in this same loop.
        self.services = {}   # request kind -> handler(identity, meta)
        self.tickers = []    # called on every turn of the loop; must not block
        self.on_reaped = []  # called with (shown pid, ("status", N) or ("signal", N))

    def log(self, line):
        print(f"{self.name}: {line}", file=self.out, flush=True)

    def serve(self):
        if not is_loopback(self.listen):
            print(f"umig agent: warning: listening on {self.listen}, which is not loopback, without "
                  "authentication: anyone who reaches it can start processes here", file=sys.stderr, flush=True)
        print(f"umig agent {self.name} listening on {self.listen}", file=self.out, flush=True)
        while True:
            if self.socket.poll(200, zmq.POLLIN):
                self._handle(self.socket.recv_multipart())
            self._reap()
            for tick in self.tickers:
                tick()

    def reply(self, identity, kind, **meta):
        try:
            self.socket.send_multipart([identity] + control(kind, **meta))
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise  # a peer that has gone needs no answer

    def _handle(self, frames):
        identity, rest = frames[0], frames[1:]
        if rest and rest[0] in (b"record", b"abort", b"commit"):
            return  # the tail of a migration that has already ended
        try:
            kind, meta = parse_control(rest)
        except UmigError as e:
            self.log(f"ignored a malformed message ({e})")
            self.reply(identity, "failed", reason=str(e))
            return
        if kind in self.services:
            self.services[kind](identity, meta)
            return
        if kind != "hello":
            self.reply(identity, "failed", reason=f"unknown request {kind[:40]!r}")
            return
        self._migration(identity, meta)

    def _busy(self, identity, frames):
        if frames and frames[0].bytes.decode(errors="replace") in self.services:
            # Short requests (load, jobs) are answered even while a migration is restored.
            self._handle([identity] + [frame.bytes for frame in frames])
            return
        if frames and frames[0].bytes == b"hello":
            self.reply(identity, "failed", reason=f"agent {self.name} is busy with another migration")

    def _migration(self, identity, hello):
        session = Session(self.socket, identity, SESSION_TIMEOUT, self._busy)
        source = f"{hello.get('host', '?')}"
        pid = hello.get("pid", "?")
        started = time.monotonic()
        restored = None
        session.send("welcome", name=self.name)

        def accept(header, state):
            pages = sum(m["pages"] for m in state["memory"]["mappings"])
            self.log(f"incoming pid {pid} from {source}: {len(state['memory']['mappings'])} mappings, {pages} pages")
            session.send("accepted")

        try:
            reader = image.ImageReader(session.next_frame)
            restored = restore(reader, str(hello.get("pid_mode", "keep")), on_accept=accept,
                               on_sync=lambda: session.send("synced"))
            session.send("ready", target_pid=restored.pid, steps=restored.phases.steps)
            session.expect("commit")
            restored.resume()
            session.send("running", target_pid=restored.pid, steps=restored.phases.steps)
            if restored.pager:
                self.log(f"pid {pid} running as {restored.pid}; post-copy of {restored.pager.missing} pages")
                ended = restored.complete(session, reader)
                session.send("complete", faults=restored.pager.faults)
                if ended:
                    end = ("status", ended.code) if ended.kind == "exited" else ("signal", ended.signo)
                    self.log(f"restored pid {restored.pid} ended during post-copy ({describe_end(end)})")
                elif restored.pager.memory_gone:
                    self.log(f"restored pid {restored.pid} executed another program during post-copy: "
                             "the pages still to come were not needed")
                if restored.pager.forks:
                    self.log(f"restored pid {restored.pid} (or a child of its) forked during post-copy: "
                             f"{restored.pager.forks} processes, whose pages came too")
        except Exception as e:
            if restored is not None:
                restored.discard()
            reason = str(e) if isinstance(e, UmigError) else f"internal error: {type(e).__name__}: {e}"
            if not isinstance(e, UmigError):
                traceback.print_exc(file=sys.stderr)
            self.reply(identity, "failed", reason=reason)  # the source may be gone: no error then
            self.log(f"pid {pid} failed: {reason}")
            return
        self.restored[restored.init_pid or restored.pid] = restored.pid
        self.log(f"pid {pid} restored as {restored.pid} ({reader.pages} pages, {reader.bytes} bytes, "
                 f"total {time.monotonic() - started:.3f} s)")

    def _reap(self):
        for waited, shown in list(self.restored.items()):
            try:
                done, status = os.waitpid(waited, os.WNOHANG)
            except ChildProcessError:
                del self.restored[waited]
                continue
            if not done:
                continue
            del self.restored[waited]
            if os.WIFSIGNALED(status):
                ended = ("signal", os.WTERMSIG(status))
            else:
                code = os.WEXITSTATUS(status)
                # A PID namespace's init passes its child's death by signal on as 128 + signal.
                ended = ("signal", code - 128) if waited != shown and code > 128 else ("status", code)
            self.log(f"restored pid {shown} {describe_end(ended)}")
            for hook in self.on_reaped:
                hook(shown, ended)


# ZeroMQ receives each page record into a megabyte it mallocs. glibc would hand such blocks back
# to the kernel between records (mmap/munmap, heap trimming), and every one would be faulted
# in and zeroed again: 20,000-60,000 page faults per GiB received, a tenth of the agent's CPU.
# Kept in the heap, they are reused as they are.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_HEAP = 32 << 20
OWN_MAPPING_ABOVE = 4 << 20


def run(listen, name, scheduling=None):
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_ABOVE)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_HEAP)
    agent = Agent(listen, name)
    from umig import balance
    balance.attach(agent, scheduling or {})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # What start-up made lives as long as the agent: a full collection that walks it all (some
    # 25,000 objects, milliseconds) must not fall inside a process's freeze.
    gc.freeze()
    agent.serve()
