"""A CPU-bound job for the experiment: ITERATIONS turns of an integer loop, then one line.
Single-threaded, no descriptors but its files, so umig can move it at any moment.
With --calibrate: print how many iterations one CPU second buys here."""
import sys
import time


def spin(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x


if sys.argv[1] == "--calibrate":
    n = 2_000_000
    started = time.process_time()
    spin(n)
    print(int(n / (time.process_time() - started)))
else:
    print("done", sys.argv[1], spin(int(sys.argv[1])), flush=True)
