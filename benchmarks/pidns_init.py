"""The init of a fresh PID namespace, for a restore that needs a PID still taken outside it.

    unshare --pid --fork --mount-proc python3 pidns_init.py STATUS_FILE COMMAND...

Runs COMMAND, waits for it, writes "EXIT_CODE CPU_SECONDS PEAK_RSS_BYTES" (from wait4,
so the command's own children count) to STATUS_FILE, and then stays: a process that
COMMAND left behind (`criu restore -d` does) passes to the namespace's init when COMMAND
ends, and the kernel kills the whole namespace when its init ends. So this init reaps
until no child is left, and ends with the last one.
"""
import os
import subprocess
import sys


def main(status_file, *command):
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    partial = status_file + ".part"
    with open(partial, "w") as f:
        f.write(f"{proc.returncode} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss * 1024}\n")
    # Whoever polls for the file sees it whole or not at all.
    os.rename(partial, status_file)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
