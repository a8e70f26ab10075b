"""ZeroMQ between a source and a target agent.

The source is a DEALER, the agent a ROUTER. Every message starts with a kind frame: control
messages carry one msgpack frame after it, image records carry their own frames (umig/image.py).

  source                              agent
  hello {pid_mode, host}        ->
                                <-    welcome {name} | failed {reason}
  record header, record state   ->
                                <-    accepted (live, lazy: once the mappings are laid out) | failed {reason}
  (live, lazy: record sync ->)
                                <-    synced (every page sent before it is in place)
  (live, lazy, the process frozen again: record layout, its record pages ..., record state;
   lazy: then record resume, where the line below has pages and the end)
  record pages ..., record end  ->    (failed {reason} may come at any time)
                                <-    ready {target_pid, steps} | failed {reason}
  commit                        ->
                                <-    running {target_pid, steps} | failed {reason}
  (steps: the target's [name, milliseconds] of the restore, then of the resume: umig/phases.py)
  post-copy (--lazy) only, once the process runs on the target:
  record pages ..., record end  ->    (the lazy pages, a few records ahead of the last placed)
                                <-    fetch {address} (a fault)  placed (a pages record is in)
                                <-    complete {faults}
  abort {reason} (at any time, when the source gives up)

A lost connection is seen at once through the socket monitor, so a dead agent costs no timeout.
"""
import collections
import ipaddress
import time
import urllib.parse

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from umig.errors import UmigError

DEFAULT_PORT = 7707
# Page batches are ~1 MiB: a few in flight keep the pipe full and the memory bounded.
HIGH_WATER_MARK = 8
# Records go out without a copy (ZeroMQ reads the caller's buffer); at most this many may still be
# unsent when send_record returns, so a buffer is free again this many records later.
UNSENT_RECORDS = HIGH_WATER_MARK + 4
# A record this small is copied into ZeroMQ's message rather than tracked until sent: a fault's
# answer (16 pages) goes out some 25 us sooner so.
COPIED_RECORD_BYTES = 80 << 10
# A silent source is asked after this long whether it is still there.
PING_INTERVAL = 1.0


def endpoint(target):
    """HOST, HOST:PORT, [IPV6]:PORT or a full tcp:// endpoint."""
    if "://" in target:
        return target
    if target.startswith("[") or target.count(":") == 1:
        host, _, port = target.rpartition(":") if not target.endswith("]") else (target, "", "")
    else:
        host, port = target, ""
    return f"tcp://{host}:{port or DEFAULT_PORT}"


def is_loopback(endpoint):
    """Whether a tcp:// endpoint is on this host's loopback."""
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def control(kind, **meta):
    return [kind.encode(), msgpack.packb(meta)]


def parse_control(frames):
    """(kind, meta) of a control message; raises UmigError on anything malformed."""
    try:
        kind = bytes(frames[0]).decode()
        meta = msgpack.unpackb(bytes(frames[1])) if len(frames) > 1 else {}
    except (IndexError, UnicodeDecodeError, ValueError, msgpack.UnpackException):
        raise UmigError("malformed control message") from None
    if not isinstance(meta, dict):
        raise UmigError("malformed control message")
    return kind, meta


class Connection:
    """The source's end: a DEALER that notices a lost peer through its monitor."""

    def __init__(self, target, timeout):
        self.endpoint = endpoint(target)
        self.timeout = timeout
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED)
        self._poller = zmq.Poller()
        self._poller.register(self._monitor, zmq.POLLIN)
        self._connected = False
        self._lost = None  # why the connection is gone, once it is: nothing more is sent then
        self._pending = collections.deque()
        self._unsent = collections.deque()  # trackers of records ZeroMQ may still be reading
        try:
            self._socket.connect(self.endpoint)
        except zmq.ZMQError as e:
            raise UmigError(f"bad target {target!r}: {e}") from None

    def _watch(self, timeout):
        """Wait up to timeout for monitor events or socket readiness; returns poll results."""
        events = dict(self._poller.poll(timeout * 1000))
        if self._monitor in events:
            while self._monitor.poll(0):
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_CONNECTED:
                    self._connected = True
                elif event == zmq.EVENT_CONNECT_RETRIED and not self._connected:
                    raise UmigError(f"no agent answers at {self.endpoint} (connection refused)")
                elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and self._connected:
                    self._lost = f"connection to the agent at {self.endpoint} was lost"
                    raise UmigError(self._lost)
        return events

    def _wait(self, flag, what):
        deadline = time.monotonic() + self.timeout
        self._poller.register(self._socket, flag)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UmigError(f"the agent at {self.endpoint} did not answer within {self.timeout:g} s ({what})")
                if self._socket in self._watch(min(left, 0.5)):
                    return
        finally:
            self._poller.unregister(self._socket)

    def send(self, frames, what="sending", copy=True):
        if self._lost:  # a message to say why we give up, for one, would wait its whole timeout
            raise UmigError(self._lost)
        # A failure the agent reports while pages still stream must stop the stream at once.
        while self._socket.poll(0, zmq.POLLIN):
            incoming = self._socket.recv_multipart()
            kind, meta = parse_control(incoming)
            if kind == "failed":
                raise UmigError(f"target failed: {meta.get('reason', 'no reason given')}")
            if kind != "ping":  # the agent checking that we are still here
                self._pending.append(incoming)
        if not self._socket.poll(0, zmq.POLLOUT):
            self._wait(zmq.POLLOUT, what)
        if copy or sum(len(frame) for frame in frames) <= COPIED_RECORD_BYTES:
            self._socket.send_multipart(frames)
            return
        # A copy into ZeroMQ's own message would cost a fresh megabyte (page faults and zeroing)
        # per record: as much CPU as the kernel's copies of the same bytes.
        self._unsent.append(self._socket.send_multipart(frames, copy=False, track=True))
        while len(self._unsent) > UNSENT_RECORDS:
            try:
                self._unsent.popleft().wait(self.timeout)
            except zmq.NotDone:
                raise UmigError(f"the agent at {self.endpoint} took no record for {self.timeout:g} s ({what})") from None

    def send_record(self, frames):
        """Send an image record; its buffers must stay as they are for UNSENT_RECORDS more records."""
        self.send([b"record"] + frames, "sending the image", copy=False)

    def send_control(self, kind, **meta):
        self.send(control(kind, **meta), f"sending {kind}")

    def _next_control(self, timeout, what):
        """The next control message but pings, or None if none comes within timeout seconds
        (timeout None: the connection's own, which raises). A `failed` becomes the error."""
        while True:
            if self._pending:
                frames = self._pending.popleft()
            elif timeout is None:
                self._wait(zmq.POLLIN, what)
                frames = self._socket.recv_multipart()
            else:
                self._poller.register(self._socket, zmq.POLLIN)
                try:
                    arrived = self._socket in self._watch(timeout)
                finally:
                    self._poller.unregister(self._socket)
                if not arrived:
                    return None
                frames = self._socket.recv_multipart()
            kind, meta = parse_control(frames)
            if kind == "failed":
                raise UmigError(f"target failed: {meta.get('reason', 'no reason given')}")
            if kind != "ping":  # the agent checking that we are still here
                return kind, meta

    def poll_control(self, timeout):
        """The next control message within timeout seconds, or None."""
        return self._next_control(timeout, "post-copy")

    def expect(self, kind, what):
        """The next control message, which must be `kind`."""
        got, meta = self._next_control(None, what)
        if got != kind:
            raise UmigError(f"the agent answered {got!r} where {kind!r} was due")
        return meta

    def close(self):
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)


class Session:
    """The agent's end of one migration: reads this source's frames off the shared ROUTER socket,
    turns other peers away while busy, notices a source that has gone (a ping to it fails: the
    socket is ROUTER_MANDATORY), and times out one that falls silent."""

    def __init__(self, socket, identity, timeout, busy_reply):
        self.socket = self._socket = socket
        self.identity = identity
        self.timeout = timeout
        self._busy_reply = busy_reply
        self._frames = collections.deque()

    def send(self, kind, **meta):
        try:
            self._socket.send_multipart([self.identity] + control(kind, **meta))
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise UmigError("the source went away (its connection closed)") from None
            raise

    def check_source(self):
        """Raise if the source has gone."""
        self.send("ping")

    def _receive(self):
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UmigError(f"the source fell silent for {self.timeout:g} s")
            if not self._socket.poll(min(left, PING_INTERVAL) * 1000, zmq.POLLIN):
                self.check_source()
                continue
            identity, *frames = self._socket.recv_multipart(copy=False)
            if identity.bytes != self.identity:
                self._busy_reply(identity.bytes, frames)
                continue
            return frames

    def ready(self):
        """Whether a frame of this source's can be had without waiting (others are answered)."""
        while not self._frames and self._socket.poll(0, zmq.POLLIN):
            identity, *frames = self._socket.recv_multipart(copy=False)
            if identity.bytes != self.identity:
                self._busy_reply(identity.bytes, frames)
            else:
                self._take(frames)
        return bool(self._frames)

    def next_frame(self):
        """The next image frame (a zero-copy buffer), for ImageReader."""
        while not self._frames:
            self._take(self._receive())
        return self._frames.popleft()

    def _take(self, frames):
        kind = frames[0].bytes
        if kind == b"record":
            self._frames.extend(frame.buffer for frame in frames[1:])
        elif kind == b"abort":
            _, meta = parse_control([f.bytes for f in frames])
            raise UmigError(f"the source aborted: {meta.get('reason', 'no reason given')}")
        else:
            raise UmigError(f"unexpected {kind[:20]!r} message in the image stream")

    def expect(self, kind):
        got, meta = parse_control([f.bytes for f in self._receive()])
        if got == "abort":
            raise UmigError(f"the source aborted: {meta.get('reason', 'no reason given')}")
        if got != kind:
            raise UmigError(f"the source sent {got!r} where {kind!r} was due")
        return meta
