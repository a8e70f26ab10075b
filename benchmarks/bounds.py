#!/usr/bin/env python3
"""What bounds stop-and-copy's throughput on this machine: each stage a page goes through, timed
alone with umig's own code paths, and the end-to-end rate those stages allow together.

A page is read from the frozen process (process_vm_readv), hashed (xxh3, every record is),
carried over loopback TCP by ZeroMQ (a send and a receive: two kernel copies and the I/O
threads), hashed again (the target verifies every record) and placed in the restored process
(UFFDIO_COPY). The stages overlap in a pipeline,
so with enough cores the slowest stage sets the pace; with C cores the CPU time of all of them
shares the C cores, so no pipeline can beat  max(slowest stage, CPU time of all stages / C).

Run with ``.venv/bin/python benchmarks/bounds.py [--mib 256] [--repeat 3]`` as root.
"""
import argparse
import mmap
import os
import subprocess
import sys
import time

import xxhash
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umig.restorer import take_fd  # noqa: E402  (after the path fix-up)
from umig.state import memory  # noqa: E402

MIB = 1 << 20
BATCH = memory.BATCH_BYTES

# A process holding `size` bytes of filled anonymous memory, and a second, empty mapping of the
# same size registered with a userfaultfd for missing pages; it prints both addresses and the fd.
HOLDER = r"""
import ctypes, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
size = int(sys.argv[1])
full = libc.mmap(None, size, 3, 0x22, -1, 0)
ctypes.memset(full, 0x5A, size)
empty = libc.mmap(None, size, 3, 0x22, -1, 0)
fd = libc.syscall(323, 0o2000000 | 0o4000)
api = ctypes.create_string_buffer(struct.pack("<QQQ", 0xAA, 0, 0), 24)
register = ctypes.create_string_buffer(struct.pack("<QQQQ", empty, size, 1, 0), 32)
if fd < 0 or libc.ioctl(fd, ctypes.c_ulong(0xC018AA3F), api) or libc.ioctl(fd, ctypes.c_ulong(0xC020AA00), register):
    sys.exit("userfaultfd: " + str(ctypes.get_errno()))
print(full, empty, fd, flush=True)
time.sleep(600)
"""

# The receiving end of the network stage: takes `count` messages, then says how long it took.
RECEIVER = r"""
import sys, time, zmq
socket = zmq.Context().socket(zmq.PULL)
port = socket.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
count = int(sys.argv[1])
socket.recv(copy=False)
started, cpu = time.monotonic(), time.process_time()
for _ in range(count - 1):
    socket.recv(copy=False)
print(time.monotonic() - started, time.process_time() - cpu, flush=True)
"""


def per_gib(seconds, size):
    return seconds * (1 << 30) / size


class Clock:
    """Wall and CPU time (all of this process's threads: ZeroMQ's I/O thread too) of a stage."""

    def __enter__(self):
        self.wall, self.cpu = time.monotonic(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.monotonic() - self.wall, time.process_time() - self.cpu


def read_stage(pid, address, size):
    with Clock() as clock:
        for _ in memory.read_batches(pid, [[address, size]]):
            pass
    return clock.wall, clock.cpu


def pages_in_memory(size):
    """`size` bytes to send from, far larger than the caches, as the pages of a real image are:
    a 1 MiB buffer used again and again would stay in the cache and flatter every stage."""
    data = mmap.mmap(-1, size)
    block = os.urandom(BATCH)
    for offset in range(0, size, BATCH):
        data[offset:offset + BATCH] = block
    return data


def hash_stage(data):
    view = memoryview(data)
    with Clock() as clock:
        for offset in range(0, len(data), BATCH):
            xxhash.xxh3_64_intdigest(view[offset:offset + BATCH])
    return clock.wall, clock.cpu


def network_stage(data):
    """ZeroMQ over loopback TCP between two processes, 1 MiB messages, as umig sends pages."""
    count = len(data) // BATCH
    view = memoryview(data)
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(count + 1)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(receiver.stdout.readline())
        socket = zmq.Context.instance().socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 8)
        socket.connect(f"tcp://127.0.0.1:{port}")
        socket.send(view[:BATCH])  # the connection is up before the clock starts, on both sides
        with Clock() as clock:
            for offset in range(0, len(data), BATCH):
                socket.send(view[offset:offset + BATCH], copy=False)
            wall, cpu = map(float, receiver.stdout.readline().split())
        socket.close(0)
        return wall, clock.cpu + cpu
    finally:
        receiver.kill()
        receiver.wait()


def place_stage(pid, empty, fd, data):
    local = take_fd(pid, fd)
    try:
        with memory.buffer_address(data) as address:
            with Clock() as clock:
                for offset in range(0, len(data), BATCH):
                    placed, err = memory.uffdio_copy(local, empty + offset, address + offset, BATCH)
                    if placed != BATCH:
                        raise SystemExit(f"UFFDIO_COPY failed: {os.strerror(err)}")
            return clock.wall, clock.cpu
    finally:
        os.close(local)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="bytes moved per stage, in MiB (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage; the fastest counts (default 3)")
    args = parser.parse_args(argv)
    size = args.mib * MIB
    cores = len(os.sched_getaffinity(0))
    stages = {}
    data = pages_in_memory(size)
    for run in range(args.repeat):
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(size)], stdout=subprocess.PIPE, text=True)
        try:
            full, empty, fd = map(int, holder.stdout.readline().split())
            times = {"read the process's memory": read_stage(holder.pid, full, size),
                     "xxh3 digest by the source": hash_stage(data),
                     "ZeroMQ over loopback TCP": network_stage(data),
                     "xxh3 digest, the target's check": hash_stage(data),
                     "UFFDIO_COPY into the process": place_stage(holder.pid, empty, fd, data)}
        finally:
            holder.kill()
            holder.wait()
        for name, (wall, cpu) in times.items():
            if name not in stages or per_gib(wall, size) < stages[name][0]:
                stages[name] = (per_gib(wall, size), per_gib(cpu, size))
    print(f"stages of stop-and-copy, alone ({args.mib} MiB each, fastest of {args.repeat}; {cores} cores), per GiB:")
    print(f"  {'stage':32} {'wall ms':>8} {'CPU ms':>8} {'GB/s':>6}")
    for name, (wall, cpu) in stages.items():
        print(f"  {name:32} {wall * 1e3:8.1f} {cpu * 1e3:8.1f} {(1 << 30) / wall / 1e9:6.2f}")
    slowest = max(wall for wall, _ in stages.values())
    cpu = sum(cpu for _, cpu in stages.values())
    bound = max(slowest, cpu / cores)
    print(f"  {'all of them (CPU)':32} {'':8} {cpu * 1e3:8.1f}")
    print(f"bound for a pipeline on {cores} cores: max(slowest stage, CPU / cores) = {bound * 1e3:.1f} ms per GiB, "
          f"{(1 << 30) / bound / 1e9:.2f} GB/s (before the Python around each stage, the fixed costs and "
          "anything else running on the machine)")


if __name__ == "__main__":
    main()
