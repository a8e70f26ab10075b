"""umig top: the cluster as one agent sees it, redrawn every interval: per node its load, CPU
and memory bars and its eligible processes; below, the migrations as they happen anywhere in
the cluster (each agent publishes its recent ones with its load)."""
import shutil
import sys
import time

from umig import jobs
from umig.errors import UmigError

MIGRATIONS_SHOWN = 10


def bar(fraction, width=20):
    fraction = max(0.0, min(1.0, fraction or 0.0))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _size(n):
    return f"{n / 2**20:.0f}M" if n < 2**30 else f"{n / 2**30:.1f}G"


def render(view, width=100):
    """The lines of one frame for a `nodes` answer."""
    lines = [f"umig top: {len(view['nodes'])} nodes seen by {view['local']}, policy {view.get('policy', 'none')}, "
             f"{time.strftime('%H:%M:%S', time.localtime(view['time']))}", ""]
    for name, n in sorted(view["nodes"].items()):
        used = 1 - n["mem_free"] / n["mem_total"] if n["mem_total"] else 0
        quota = f", quota {n['quota']:g}" if n.get("quota") else ""
        lines.append(f"{name:<12} load {n['load']:5.2f} {bar(n['load'] / 2)}  cpu {bar(n.get('cpu'), 10)} "
                     f"{(n.get('cpu') or 0) * 100:3.0f}%  mem {bar(used, 10)} {_size(n['mem_free'])} free  "
                     f"{n['runq']} runnable / {n['capacity']:g} cores{quota}  {n['endpoint']}")
        for p in n["processes"]:
            state = "eligible" if p["eligible"] else f"not movable: {p.get('blocker', '?')}"
            job = f" job {p['job']}" if p.get("job") else ""
            lines.append(f"    {p['pid']:>7} {p['name'][:15]:<15} age {p['cpu_age']:7.1f} s  rss "
                         f"{_size(p['rss']):>5}{job}  {state}"[:width])
    lines += ["", "migrations in the cluster:"]
    for e in list(view.get("migrations", ()))[-MIGRATIONS_SHOWN:]:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        what = {"start": f"moving ({e.get('policy')}: {e.get('reason', '')})",
                "done": f"done as pid {e.get('target_pid')}, frozen {e.get('frozen_s', 0):.3f} s of "
                        f"{e.get('total_s', 0):.3f} s",
                "failed": f"failed: {e.get('reason')}"}.get(e["event"], e["event"])
        lines.append(f"  {when} pid {e['pid']} {e['from']} -> {e['to']} {what}"[:width])
    return lines


def main(agent, interval=1.0, once=False):
    while True:
        try:
            frame = render(jobs.request(agent, "nodes", "nodes"), shutil.get_terminal_size().columns)
        except UmigError as e:
            if once:
                raise
            frame = [f"umig top: {e}"]
        if once:
            print("\n".join(frame))
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(frame) + "\n")
        sys.stdout.flush()
        time.sleep(interval)
