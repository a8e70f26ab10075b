"""The cluster view: every agent publishes its node's load at a fixed interval on a ZeroMQ PUB
socket and subscribes to its peers'. A peer that falls silent for `timeout` seconds leaves the
view; it comes back when it speaks again.

A node is what its agent can see of the machine. An agent that runs in a cpu cgroup of its own
(cgroup v1) takes that cgroup as its node: the run queue, the CPU used and the processes are the
cgroup's, and its CPU quota caps the capacity. Several agents can then share one host as
emulated nodes of unequal capacity. An agent in the root cgroup takes the whole host.

Message on the PUB socket: [b"load", msgpack(sample)], where sample is the dict `Node.sample`
returns (its keys are documented in docs/scheduling.md).
"""
import fnmatch
import os
import time
import urllib.parse

import msgpack
import psutil
import zmq

from umig import dump
from umig.errors import UmigError
from umig.transport import endpoint as agent_endpoint

DEFAULT_INTERVAL = 1.0
PUBLISHED_MIGRATIONS = 10  # a node's most recent migration events travel with each of its samples
DEFAULT_TIMEOUT = 5.0
CGROUP_ROOT = "/sys/fs/cgroup"
TOPIC = b"load"


def publish_endpoint(listen):
    """An agent publishes on its own port + 1 (an ipc endpoint: its path + '.pub')."""
    listen = agent_endpoint(listen)
    parts = urllib.parse.urlsplit(listen)
    if parts.scheme == "tcp" and parts.port:
        return listen.rsplit(":", 1)[0] + f":{parts.port + 1}"
    return listen + ".pub"


def read_peers(path):
    """A cluster file: one agent endpoint per line; '#' starts a comment."""
    with open(path) as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


# --------------------------------------------------------------------------- cgroup v1

def cgroup_path(controller, pid="self"):
    """This process's cgroup in a v1 hierarchy that carries `controller`, as a directory, or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    for mount in (controllers, controller):
                        directory = os.path.join(CGROUP_ROOT, mount, path.lstrip("/"))
                        if os.path.isdir(directory):
                            return directory
    except OSError:
        pass
    return None


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_quota(directory):
    """The tightest CFS quota, in cores, on the way from this cgroup up to the root, or None."""
    quota = None
    while directory and directory.startswith(CGROUP_ROOT + "/"):
        q, period = _read_int(os.path.join(directory, "cpu.cfs_quota_us")), \
            _read_int(os.path.join(directory, "cpu.cfs_period_us"))
        if q and q > 0 and period:
            quota = q / period if quota is None else min(quota, q / period)
        parent = os.path.dirname(directory)
        if parent == directory or not os.path.exists(os.path.join(parent, "cgroup.procs")):
            break
        directory = parent
    return quota


def _is_root(directory):
    return directory is None or not os.path.exists(os.path.join(os.path.dirname(directory), "cgroup.procs"))


# --------------------------------------------------------------------------- this node

class Rules:
    """Which processes the user made eligible besides umig run's jobs: by uid, cgroup (a substring
    of any line of /proc/PID/cgroup) or name (a shell pattern). A process matches when it passes
    every rule that is given; with no rule, none matches."""

    def __init__(self, uids=(), cgroups=(), names=()):
        self.uids, self.cgroups, self.names = set(uids), list(cgroups), list(names)

    def __bool__(self):
        return bool(self.uids or self.cgroups or self.names)

    def match(self, proc):
        try:
            if self.uids and proc.uids().real not in self.uids:
                return False
            if self.names and not any(fnmatch.fnmatchcase(proc.name(), n) for n in self.names):
                return False
            if self.cgroups:
                with open(f"/proc/{proc.pid}/cgroup") as f:
                    text = f.read()
                if not any(c in text for c in self.cgroups):
                    return False
        except (psutil.Error, OSError):
            return False
        return True


class Node:
    """Measures this node. `jobs` (umig.jobs.Jobs or None) names the processes umig run started
    here, with the CPU age they brought from elsewhere."""

    def __init__(self, name, listen, jobs=None, rules=None):
        self.name = name
        self.endpoint = agent_endpoint(listen)
        self.jobs = jobs
        self.migrations = ()  # this node's migration events, oldest first (the balancer's)
        self.rules = rules or Rules()
        self.cpu_cgroup = cgroup_path("cpu")
        self.acct_cgroup = cgroup_path("cpuacct")
        self.memory_cgroup = cgroup_path("memory")
        self.scoped = not _is_root(self.cpu_cgroup)
        self.cores = len(os.sched_getaffinity(0))
        self.quota = cpu_quota(self.cpu_cgroup)
        self.capacity = min(self.cores, self.quota) if self.quota else float(self.cores)
        self.seq = 0
        self._last_usage = None  # (monotonic, cpu seconds) for the utilisation between samples
        psutil.cpu_percent(None)

    def _scope_pids(self):
        """PIDs (threads included) that count towards this node's load."""
        if self.scoped:
            try:
                with open(os.path.join(self.cpu_cgroup, "tasks")) as f:
                    return {int(t) for t in f.read().split()}
            except OSError:
                pass
        return None

    def _run_queue(self, tids):
        if tids is None:
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("procs_running"):
                        return max(0, int(line.split()[1]) - 1)  # minus this sampler
            return 0
        running = 0
        for tid in tids:
            if tid == os.getpid():
                continue
            try:
                with open(f"/proc/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            running += stat[stat.rindex(")") + 2] == "R"
        return running

    def _utilisation(self):
        """CPU used since the last sample, as a fraction of capacity."""
        if not self.scoped:
            return psutil.cpu_percent(None) / 100.0
        usage_ns = _read_int(os.path.join(self.acct_cgroup or "", "cpuacct.usage"))
        if usage_ns is None:
            return None
        now, usage = time.monotonic(), usage_ns / 1e9
        last, self._last_usage = self._last_usage, (now, usage)
        if last is None or now <= last[0]:
            return 0.0
        return min(1.0, (usage - last[1]) / (now - last[0]) / self.capacity)

    def _memory(self):
        vm = psutil.virtual_memory()
        total, free = vm.total, vm.available
        if self.memory_cgroup and not _is_root(self.memory_cgroup):
            limit = _read_int(os.path.join(self.memory_cgroup, "memory.limit_in_bytes"))
            used = _read_int(os.path.join(self.memory_cgroup, "memory.usage_in_bytes"))
            if limit and used is not None and limit < total:
                total, free = limit, min(free, max(0, limit - used))
        return total, free

    def _candidates(self, tids):
        """(pid, job record or None) of every process the user made eligible on this node."""
        found = {}
        if self.jobs is not None:
            for job in self.jobs.running_here():
                found[job.pid] = job
        if self.rules:
            pids = tids if tids is not None else psutil.pids()
            for pid in pids:
                if pid in found or pid == os.getpid():
                    continue
                try:
                    proc = psutil.Process(pid)
                    if proc.pid != pid or proc.status() == psutil.STATUS_ZOMBIE:
                        continue  # a thread, not a process
                except psutil.Error:
                    continue
                if self.rules.match(proc):
                    found[pid] = None
        return found

    def _process(self, pid, job):
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                entry = {"pid": pid, "name": proc.name(), "rss": proc.memory_info().rss,
                         "cpu_age": times.user + times.system, "job": None}
        except psutil.Error:
            return None
        if job is not None:
            entry.update(cpu_age=entry["cpu_age"] + job.carried_age, job=job.id, moved_at=job.moved_at)
        blockers = dump.check(pid)
        entry["eligible"] = not blockers
        if blockers:
            entry["blocker"] = blockers[0]
        return entry

    def sample(self):
        tids = self._scope_pids()
        runq = self._run_queue(tids)
        total, free = self._memory()
        processes = [p for p in (self._process(pid, job) for pid, job in sorted(self._candidates(tids).items()))
                     if p is not None]
        self.seq += 1
        return {"name": self.name, "endpoint": self.endpoint, "seq": self.seq, "time": time.time(),
                "cores": self.cores, "quota": self.quota, "capacity": self.capacity,
                "runq": runq, "load": runq / self.capacity, "loadavg": list(os.getloadavg()),
                "cpu": self._utilisation(), "mem_total": total, "mem_free": free, "processes": processes,
                "last_in": self.jobs.last_adopted if self.jobs is not None else 0.0,
                "migrations": list(self.migrations)[-PUBLISHED_MIGRATIONS:]}


# --------------------------------------------------------------------------- the view

class View:
    """The nodes an agent currently knows, its own included, by name. Pure data, so that
    policies and tests can build one by hand: View(local_name, {name: sample})."""

    def __init__(self, local, nodes, now=None):
        self.local = local
        self.nodes = dict(nodes)
        self.now = time.time() if now is None else now

    @property
    def me(self):
        return self.nodes[self.local]

    def peers(self):
        return [n for name, n in sorted(self.nodes.items()) if name != self.local]

    @property
    def migrations(self):
        """The recent migration events of every node in the view, oldest first."""
        return recent_migrations(*(n.get("migrations", ()) for n in self.nodes.values()))

    def to_json(self):
        return {"local": self.local, "time": self.now, "nodes": self.nodes}


def recent_migrations(*event_lists):
    """Migration events gathered from several places, each once, oldest first. An event is
    made by the node that sends the process, so its sender, process, kind and time name it."""
    unique = {(e["from"], e["pid"], e["event"], e["time"]): e for events in event_lists for e in events}
    return sorted(unique.values(), key=lambda e: e["time"])


class Cluster:
    """Samples this node, publishes the samples (when `publish` is an endpoint) and keeps the
    view from the peers' (used from the agent's single-threaded loop through tick())."""

    def __init__(self, node, publish, peers=(), interval=DEFAULT_INTERVAL, timeout=DEFAULT_TIMEOUT, log=print):
        self.node = node
        self.interval = interval
        self.timeout = timeout
        self.log = log
        context = zmq.Context.instance()
        self.pub = None
        if publish:
            self.pub = context.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            try:
                self.pub.bind(publish)
            except zmq.ZMQError as e:
                raise UmigError(f"cannot publish the load on {publish}: {e}") from None
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.peer_endpoints = []
        for peer in peers:
            peer = agent_endpoint(peer)
            if peer != node.endpoint:
                self.peer_endpoints.append(peer)
                self.sub.connect(publish_endpoint(peer))
        self.samples = {}  # name -> (sample, monotonic time received)
        self.gone = set()  # names that fell silent, to log their return
        self._next = 0.0

    def tick(self):
        """Publish when due, take in what peers said, drop the silent. Never blocks."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            sample = self.node.sample()
            self.samples[sample["name"]] = (sample, now)
            if self.pub is not None:
                self.pub.send_multipart([TOPIC, msgpack.packb(sample)])
        while self.sub.poll(0, zmq.POLLIN):
            frames = self.sub.recv_multipart()
            try:
                sample = msgpack.unpackb(frames[1])
                name = sample["name"]
            except (IndexError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                continue
            if name == self.node.name:
                continue
            if name not in self.samples:
                self.log(f"node {name} {'is back' if name in self.gone else 'joined'} ({sample.get('endpoint')})")
                self.gone.discard(name)
            self.samples[name] = (sample, now)
        for name, (sample, seen) in list(self.samples.items()):
            if name != self.node.name and now - seen > self.timeout:
                del self.samples[name]
                self.gone.add(name)
                self.log(f"node {name} fell silent for {self.timeout:g} s: left the view")

    def view(self):
        return View(self.node.name, {name: sample for name, (sample, _) in self.samples.items()})

    def close(self):
        for s in (self.pub, self.sub):
            if s is not None:
                s.close(0)
