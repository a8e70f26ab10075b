"""The image: a versioned stream of checksummed records (docs/image-format.md).

A record is one head frame (an 8-byte xxh3-64 digest of the msgpack body, then the body) and, for
page batches, one raw payload frame. The same records travel as ZeroMQ multipart messages
(`migrate`) or as length-prefixed frames in a file (`dump`/`restore`), so the two paths share
every check.
"""
import os
import struct
import time
from typing import NamedTuple

import lz4.frame
import msgpack
import xxhash
import zstandard

from umig.errors import DamagedImage, UmigError

# 2: a lazy stream has a first and a final state (version 1 had one). 3: a live stream may ask the
# target to say when it has placed every page sent so far (sync); a lazy one has pages (and
# syncs) between its two states. 4: the final state of a live or lazy stream comes in two
# records, its mappings (layout) and its last pages first, then the rest.
FORMAT_VERSION = 4
FILE_MAGIC = b"UMIGIMG\n"
KINDS = ("header", "state", "pages", "sync", "layout", "resume", "end")
# A frame longer than this is a damaged length prefix, not data: batches are ~1 MiB.
MAX_FRAME = 256 << 20
_LENGTH = struct.Struct("<Q")
_DIGEST_SIZE = 8


# Page payloads may travel compressed (meta "codec"); digests cover what travels. Both codecs
# were chosen for speed: at their fastest levels each compresses a megabyte in well under a
# millisecond here, so they pay wherever the link is slower than a few GB/s.
# Decompression is bounded by MAX_FRAME: a damaged or hostile payload must not inflate without end.
CODECS = {
    "lz4": (lambda data: lz4.frame.compress(data, compression_level=0),
            lambda data: lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=MAX_FRAME)),
    "zstd": (zstandard.ZstdCompressor(level=1).compress,
             lambda data: zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_FRAME)),
}


class Record(NamedTuple):
    kind: str
    meta: dict
    payload: object = None  # a buffer (pages) or None


def _digest(data):
    return xxhash.xxh3_64_intdigest(data)


def encode(record, seq):
    """The frames of one record: [head] or [head, payload]."""
    payload = record.payload
    body = msgpack.packb([record.kind, seq, record.meta,
                          -1 if payload is None else len(payload),
                          0 if payload is None else _digest(payload)])
    head = _digest(body).to_bytes(_DIGEST_SIZE, "little") + body
    return [head] if payload is None else [head, payload]


def decode_head(head):
    """Verify a head frame; returns (kind, seq, meta, payload_length, payload_digest)."""
    head = memoryview(head)
    if len(head) < _DIGEST_SIZE + 1:
        raise DamagedImage("damaged image: a record head is truncated")
    body = head[_DIGEST_SIZE:]
    if _digest(body) != int.from_bytes(head[:_DIGEST_SIZE], "little"):
        raise DamagedImage("damaged image: a record head fails its checksum")
    try:
        kind, seq, meta, payload_length, payload_digest = msgpack.unpackb(body, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DamagedImage(f"damaged image: a record head does not decode ({e})") from None
    if kind not in KINDS or not isinstance(meta, dict):
        raise DamagedImage(f"damaged image: unknown record kind {kind!r}")
    return kind, seq, meta, payload_length, payload_digest


def check_payload(kind, payload, length, digest):
    if payload is None or len(payload) != length:
        raise DamagedImage(f"damaged image: a {kind} record's payload is missing or has the wrong length")
    if _digest(payload) != digest:
        raise DamagedImage(f"damaged image: a {kind} record's payload fails its checksum")


class ImageReader:
    """Turns frames into verified records and enforces the record order of the schema:
    header, state, pages..., end."""

    def __init__(self, next_frame):
        self._next_frame = next_frame  # callable returning the next frame (a buffer)
        self._seq = 0
        self._ended = False
        self._mode = None
        self._stage = None  # of a live or lazy stream: "running", then "final layout", "final state"
        self.pages = 0
        self.bytes = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        kind, seq, meta, payload_length, payload_digest = decode_head(self._next_frame())
        if seq != self._seq:
            raise DamagedImage(f"damaged image: record {seq} arrived where record {self._seq} belongs")
        # Live and lazy streams have a second, final state after pages sent while the process
        # ran (and syncs among them): its layout, the last pages, the rest; then a live one
        # ends, a lazy one says where the process resumes, and the rest of its pages follow.
        expected = {"running": ("pages", "sync", "layout"), "final layout": ("pages", "state"),
                    "final state": ("end",) if self._mode == "live" else ("resume",)}.get(
                        self._stage, ("header",) if seq == 0 else ("state",) if seq == 1 else ("pages", "end"))
        if kind not in expected:
            raise DamagedImage(f"damaged image: a {kind} record where {' or '.join(expected)} belongs")
        payload = None
        if payload_length >= 0:
            payload = self._next_frame()
            check_payload(kind, payload, payload_length, payload_digest)
            if "codec" in meta:
                payload = _decompress(meta["codec"], payload)
        self._seq += 1
        if kind == "header":
            check_header(meta)
        elif kind == "state" and seq == 1:
            self._mode = meta.get("mode")
            self._stage = "running" if self._mode in ("live", "lazy") else None
        elif kind == "layout":
            self._stage = "final layout"
        elif kind == "state":
            self._stage = "final state"
        elif kind == "resume":
            self._stage = None  # the lazy pages, then the end
        elif kind == "pages":
            check_runs(meta, payload)
            self.pages += len(payload) // 4096
            self.bytes += len(payload)
        elif kind == "end":
            if (meta.get("records"), meta.get("pages"), meta.get("bytes")) != (seq, self.pages, self.bytes):
                raise DamagedImage("damaged image: records are missing (the end record's counts differ)")
            self._ended = True
        return Record(kind, meta, payload)


def _decompress(codec, payload):
    if codec not in CODECS:
        raise DamagedImage(f"damaged image: unknown page codec {codec!r}")
    try:
        return CODECS[codec][1](payload)
    except Exception as e:  # each codec has its own error types
        raise DamagedImage(f"damaged image: {codec} payload does not decompress ({e})") from None


def check_header(meta):
    if meta.get("format") != "umig":
        raise DamagedImage("not a umig image (bad format tag)")
    if meta.get("version") != FORMAT_VERSION:
        raise UmigError(f"image format version {meta.get('version')} is not supported "
                        f"(this umig reads version {FORMAT_VERSION})")


def check_runs(meta, payload):
    runs = meta.get("runs")
    try:  # runs are page-aligned [start, length] pairs adding up to the payload
        whole = sum(length for _, length in runs) == len(payload) and not any(
            start % 4096 or length % 4096 or length <= 0 for start, length in runs)
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise DamagedImage("damaged image: a pages record's runs do not match its payload")


def header(pid):
    return Record("header", {"format": "umig", "version": FORMAT_VERSION, "created": time.time(),
                             "host": os.uname().nodename, "kernel": os.uname().release, "pid": pid})


class ImageWriter:
    """Numbers records, compresses page payloads if asked, keeps the end record's counts (of
    pages as they are) and how many bytes went out, and hands frames to a sink."""

    def __init__(self, send_frames, codec="none", holds=0):
        self._send_frames = send_frames
        self.holds = holds  # records whose payload the sink may still be reading when it returns
        self._compress = CODECS[codec][0] if codec != "none" else None
        self._codec = codec
        self._seq = 0
        self.pages = 0
        self.bytes = 0
        self.wire_bytes = 0

    def write(self, record):
        if record.kind == "pages":
            self.pages += len(record.payload) // 4096
            self.bytes += len(record.payload)
            if self._compress:
                record = Record("pages", dict(record.meta, codec=self._codec), self._compress(record.payload))
        frames = encode(record, self._seq)
        self.wire_bytes += sum(len(frame) for frame in frames)
        self._send_frames(frames)
        self._seq += 1

    def end(self):
        self.write(Record("end", {"records": self._seq, "pages": self.pages, "bytes": self.bytes}))


# --- files: the magic, then each frame as a little-endian u64 length and its bytes ---------------

class FileSink:
    """Writes an image to a temporary file beside `path`, renamed over it only once complete: a
    failed dump leaves whatever was at `path` untouched."""

    def __init__(self, path):
        self.path = path
        directory, name = os.path.split(os.path.abspath(path))
        if os.path.exists(path) and not os.path.isfile(path):
            raise UmigError(f"cannot write the image to {path}: not a regular file")
        self._temporary = os.path.join(directory, f".{name}.umig-partial")
        try:
            self._file = open(self._temporary, "wb")
        except OSError as e:
            raise UmigError(f"cannot write the image to {path}: {e.strerror}") from None
        self._file.write(FILE_MAGIC)

    def __call__(self, frames):
        for frame in frames:
            self._file.write(_LENGTH.pack(len(frame)))
            self._file.write(frame)

    def commit(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._temporary, self.path)

    def discard(self):
        self._file.close()
        os.unlink(self._temporary)


def open_image_file(path):
    """An ImageReader over an image file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UmigError(f"cannot open image {path}: {e.strerror}") from None
    if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
        raise DamagedImage(f"{path} is not a umig image (bad magic)")

    def next_frame():
        prefix = f.read(_LENGTH.size)
        if len(prefix) < _LENGTH.size:
            raise DamagedImage(f"damaged image: {path} ends early")
        (length,) = _LENGTH.unpack(prefix)
        if length > MAX_FRAME:
            raise DamagedImage(f"damaged image: a frame length of {length} bytes in {path}")
        data = bytearray(length)
        if f.readinto(data) != length:
            raise DamagedImage(f"damaged image: {path} ends early")
        return data
    return ImageReader(next_frame)
