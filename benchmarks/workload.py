"""The CPython workload: an ordinary interpreter holding about SIZE_MIB MiB of objects.

    python3 workload.py DIR SIZE_MIB

It speaks the protocol of workload.c (DIR/ready, a timestamp loop, SIGUSR1 -> DIR/result
with "ok|bad key=value ..." and the longest gap between iterations since the last
report), so the harness treats both alike. Standard library only: the interpreter the
benchmark moves must stay unmodified and free of extensions.
"""
import hashlib
import os
import signal
import sys
import time

NAP_S = 0.001
# Roughly what one record below costs in the heap (dict, two strings, a float, list slot).
BYTES_PER_RECORD = 400


def build(size_mib):
    n = size_mib * 2**20 // BYTES_PER_RECORD
    return [{"i": i, "s": f"{i:08d}" * 8, "t": str(i * 7), "f": i * 0.5} for i in range(n)]


def digest(records):
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['i']}|{r['s']}|{r['t']}|{r['f']!r};".encode())
    return h.hexdigest()


def put_file(directory, name, text):
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(directory, name))  # the reader never sees half a file


def main():
    directory, size_mib = sys.argv[1], int(sys.argv[2])
    requested = []
    signal.signal(signal.SIGUSR1, lambda *_: requested.append(True))

    records = build(size_mib)
    expected = digest(records)
    put_file(directory, "ready", f"ready pid={os.getpid()} kind=python records={len(records)}\n")

    last = since = time.monotonic_ns()
    max_gap, gap_end, iterations = 0, last, 0
    while True:
        t = time.monotonic_ns()
        if t - last > max_gap:
            max_gap, gap_end = t - last, t
        last = t
        iterations += 1
        if requested:
            requested.clear()
            ok = digest(records) == expected
            put_file(directory, "result",
                     f"{'ok' if ok else 'bad'} pid={os.getpid()} kind=python records={len(records)} "
                     f"wrong_pages={0 if ok else 1} max_gap_ns={max_gap} gap_end_ns={gap_end} "
                     f"since_ns={since} iterations={iterations}\n")
            last = since = time.monotonic_ns()
            max_gap, gap_end, iterations = 0, last, 0
        time.sleep(NAP_S)


if __name__ == "__main__":
    main()
