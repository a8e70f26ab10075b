#!/usr/bin/env python3
"""Stop-and-copy only: the harness (bench.py) with idle heaps and plain `umig migrate`.

    .venv/bin/python benchmarks/bench_stop_and_copy.py [--sizes 16 256 1024] [--repeat N]

Kept so that the first benchmark's command still works; any bench.py option may follow.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import main  # noqa: E402  (after the path fix-up)

if __name__ == "__main__":
    sys.exit(main(["--workloads", "idle", "--modes", "stop", "--no-criu",
                   "--name", "stop_and_copy", *sys.argv[1:]]))
