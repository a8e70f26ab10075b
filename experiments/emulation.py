"""Emulated nodes on one host: each a network namespace joined to the others through a bridge
(a veth pair per node into a hub namespace), and a cpu cgroup with a CFS quota, so that nodes
have unequal capacity. An agent started with `agent_prefix(i)` lives in node i's namespace and
cgroup, and so do the processes it starts and restores.

Needs root, `ip` (iproute2) and cgroup v1's cpu hierarchy. remove() ends every process left in
the nodes' cgroups and deletes the namespaces and cgroups.
"""
import contextlib
import os
import random
import shlex
import signal
import subprocess
import time

CGROUP = "/sys/fs/cgroup"
PERIOD_US = 100_000


def _ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class EmulatedCluster:
    """Nodes of the given `capacities` (cores); with `memory_limits` (bytes or None, one per
    node) each node also gets a memory cgroup, limited where a number is given."""

    def __init__(self, capacities, port=7707, tag=None, memory_limits=None):
        self.capacities = list(capacities)
        self.memory_limits = list(memory_limits) if memory_limits else None
        self.tag = tag or "%06x" % random.randrange(1 << 24)
        subnet = random.Random(self.tag).randrange(100, 250), random.Random(self.tag + "y").randrange(1, 250)
        self.names = [f"node-{chr(ord('a') + i)}" for i in range(len(self.capacities))]
        self.netns = [f"umig-{self.tag}-{n}" for n in self.names]
        self.hub = f"umig-{self.tag}-hub"
        self.ips = [f"10.{subnet[0]}.{subnet[1]}.{i + 1}" for i in range(len(self.capacities))]
        self.endpoints = [f"tcp://{ip}:{port}" for ip in self.ips]
        self.hub_ip = f"10.{subnet[0]}.{subnet[1]}.254"  # for a driver that enters the hub namespace
        controllers = ("cpu", "cpuacct") + (("memory",) if self.memory_limits else ())
        self.cgroups = {c: os.path.join(CGROUP, c, f"umig-{self.tag}") for c in controllers}
        self._made_ns, self._made_cg = [], []

    def cgroup(self, controller, i):
        return os.path.join(self.cgroups[controller], self.names[i])

    def create(self):
        try:
            _ip("netns", "add", self.hub)
            self._made_ns.append(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.hub_ip}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.netns):
                _ip("netns", "add", ns)
                self._made_ns.append(ns)
                inside, outside = f"eth{i}", f"port{i}"
                _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.hub)
                _ip("-n", self.hub, "link", "set", outside, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            for controller, top in self.cgroups.items():
                os.makedirs(top, exist_ok=True)
                self._made_cg.append(top)
                for i in range(len(self.names)):
                    os.makedirs(self.cgroup(controller, i), exist_ok=True)
                    self._made_cg.append(self.cgroup(controller, i))
            for i, capacity in enumerate(self.capacities):
                with open(os.path.join(self.cgroup("cpu", i), "cpu.cfs_period_us"), "w") as f:
                    f.write(str(PERIOD_US))
                with open(os.path.join(self.cgroup("cpu", i), "cpu.cfs_quota_us"), "w") as f:
                    f.write(str(int(capacity * PERIOD_US)))
            for i, limit in enumerate(self.memory_limits or ()):
                if limit is not None:
                    with open(os.path.join(self.cgroup("memory", i), "memory.limit_in_bytes"), "w") as f:
                        f.write(str(int(limit)))
        except BaseException:
            self.remove()
            raise
        return self

    def agent_prefix(self, i, *agent_args):
        """A command prefix that puts what follows into node i (its cgroups, then its namespace)
        and appends `agent_args` to it."""
        join = "; ".join(f"echo $$ > {shlex.quote(os.path.join(self.cgroup(c, i), 'cgroup.procs'))}"
                         for c in self.cgroups)
        # nsenter, not `ip netns exec`: that remounts /sys, which hides the cgroup hierarchies.
        return ["sh", "-c", f'{join}; exec nsenter --net=/run/netns/{shlex.quote(self.netns[i])} "$@" '
                + shlex.join(map(str, agent_args)), "sh"]

    def peers_of(self, i):
        return [a for j, ep in enumerate(self.endpoints) if j != i for a in ("--peer", ep)]

    def enter_hub(self):
        """Move this thread into the hub namespace, from where every node is reachable. Call it
        before anything starts threads (a ZeroMQ context): they keep the namespace they began in."""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.hub}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns into the hub namespace")
        finally:
            os.close(fd)

    def kill_all(self):
        """End every process in the nodes' cgroups (agents, jobs, restored processes)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def cpu_used_s(self):
        """CPU seconds used so far by everything in the nodes' cgroups."""
        total = 0
        for i in range(len(self.names)):
            with open(os.path.join(self.cgroup("cpuacct", i), "cpuacct.usage")) as f:
                total += int(f.read())
        return total / 1e9

    def pids(self):
        found = set()
        for path in self._made_cg:
            with contextlib.suppress(OSError):
                with open(os.path.join(path, "cgroup.procs")) as f:
                    found |= {int(p) for p in f.read().split()}
        return found

    def remove(self):
        """End everything still in the nodes and take them down."""
        self.kill_all()
        for path in reversed(self._made_cg):
            for _ in range(50):  # a killed task leaves its cgroup a moment later
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self._made_cg.clear()
        for ns in reversed(self._made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made_ns.clear()
