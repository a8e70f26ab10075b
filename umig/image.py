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

import msgpack
import xxhash

from umig.errors import DamagedImage, UmigError

FORMAT_VERSION = 1
FILE_MAGIC = b"UMIGIMG\n"
KINDS = ("header", "state", "pages", "resume", "end")
# A frame longer than this is a damaged length prefix, not data: batches are ~1 MiB.
MAX_FRAME = 256 << 20
_LENGTH = struct.Struct("<Q")
_DIGEST_SIZE = 8


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
        # A live migration's stream has a second, final state after the pages copied while it ran;
        # a lazy one says where the process resumes, and the rest of its pages follow.
        expected = ("header",) if seq == 0 else ("state",) if seq == 1 else \
            ("pages", "state", "end") if self._mode == "live" else \
            ("pages", "resume", "end") if self._mode == "lazy" else ("pages", "end")
        if kind not in expected:
            raise DamagedImage(f"damaged image: a {kind} record where {' or '.join(expected)} belongs")
        payload = None
        if payload_length >= 0:
            payload = self._next_frame()
            check_payload(kind, payload, payload_length, payload_digest)
        self._seq += 1
        if kind == "header":
            check_header(meta)
        elif kind == "state" and seq == 1:
            self._mode = meta.get("mode")
        elif kind == "resume":
            self._mode = None  # once
        elif kind == "pages":
            check_runs(meta, payload)
            self.pages += len(payload) // 4096
            self.bytes += len(payload)
        elif kind == "end":
            if (meta.get("records"), meta.get("pages"), meta.get("bytes")) != (seq, self.pages, self.bytes):
                raise DamagedImage("damaged image: records are missing (the end record's counts differ)")
            self._ended = True
        return Record(kind, meta, payload)


def check_header(meta):
    if meta.get("format") != "umig":
        raise DamagedImage("not a umig image (bad format tag)")
    if meta.get("version") != FORMAT_VERSION:
        raise UmigError(f"image format version {meta.get('version')} is not supported "
                        f"(this umig reads version {FORMAT_VERSION})")


def check_runs(meta, payload):
    runs = meta.get("runs")
    if not isinstance(runs, list) or sum(length for _, length in runs) != len(payload):
        raise DamagedImage("damaged image: a pages record's runs do not match its payload")


def header(pid):
    return Record("header", {"format": "umig", "version": FORMAT_VERSION, "created": time.time(),
                             "host": os.uname().nodename, "kernel": os.uname().release, "pid": pid})


class ImageWriter:
    """Numbers records, keeps the end record's counts, and hands frames to a sink."""

    def __init__(self, send_frames):
        self._send_frames = send_frames
        self._seq = 0
        self.pages = 0
        self.bytes = 0

    def write(self, record):
        if record.kind == "pages":
            self.pages += len(record.payload) // 4096
            self.bytes += len(record.payload)
        self._send_frames(encode(record, self._seq))
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
