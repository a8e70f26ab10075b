"""Migration policies: which process goes where.

A policy is a class with one method:

    class MyPolicy(umig.policies.Policy):
        name = "mine"
        def decide(self, view):
            '''view: umig.cluster.View of the nodes this agent knows (view.me is this node).
            Returns a list of Migration, best first, each moving one of view.me's processes.'''

Options given with `umig agent --balance-opt KEY=VALUE` arrive as keyword arguments of the
constructor (as strings: convert them). The agent calls decide() about once per load interval,
offers what it returns to the guards (umig/balance.py) in order and starts the first they admit.
A policy only proposes: it never sees processes that are not eligible, and the guards, not the
policy, keep the cluster from thrashing.

`umig agent --balance NAME` takes a shipped policy (none, threshold, age, memory) or a class
from anywhere: `package.module:Class`, `package.module.Class` or `/path/to/file.py:Class`.
"""
import dataclasses
import importlib
import importlib.util
import random
import statistics

from umig.errors import UmigError


@dataclasses.dataclass
class Migration:
    """One proposal: move process `pid` (the umig run job `job`, if it is one) from node `source`
    to node `target`. `metric` says which guard compares the two nodes: "load" or "memory"."""
    pid: int
    source: str
    target: str
    reason: str
    metric: str = "load"
    job: str = None
    age: float = 0.0
    rss: int = 0


def eligible(node):
    return [p for p in node.get("processes", ()) if p.get("eligible")]


def proposal(node, process, target, reason, metric="load"):
    return Migration(pid=process["pid"], source=node["name"], target=target["name"], reason=reason, metric=metric,
                     job=process.get("job"), age=process["cpu_age"], rss=process["rss"])


def load_after(node, extra=1):
    """The node's load (runnable processes per core of capacity) with `extra` more processes."""
    return (node["runq"] + extra) / node["capacity"]


class Policy:
    name = "none"

    def __init__(self, **options):
        if options:
            raise UmigError(f"policy {self.name} takes no option {sorted(options)[0]!r}")

    def decide(self, view):
        return []


class Threshold(Policy):
    """Sender-initiated, after Eager, Lazowska & Zahorjan (1986): a node whose CPU queue holds
    more than `threshold` runnable processes probes up to `probes` random peers and sends to the
    first whose queue would still be at or below the threshold with one process more. As in the
    paper the threshold counts processes, not load per core: a node smaller than one core is not
    overloaded by its single job. It places work rather than preempting it: only processes
    younger than `max_age` CPU seconds (new arrivals) are sent, the youngest first."""
    name = "threshold"

    def __init__(self, threshold=1, probes=3, max_age=1.0, seed=None, **options):
        self.threshold = float(threshold)
        self.probes = int(probes)
        self.max_age = float(max_age)
        self.random = random.Random(None if seed is None else int(seed))
        super().__init__(**options)

    def decide(self, view):
        me = view.me
        if me["runq"] <= self.threshold:
            return []
        young = sorted((p for p in eligible(me) if p["cpu_age"] < self.max_age), key=lambda p: p["cpu_age"])
        if not young:
            return []
        peers = view.peers()
        for peer in self.random.sample(peers, min(self.probes, len(peers))):
            if peer["runq"] + 1 <= self.threshold:
                return [proposal(me, young[0], peer,
                                 f"queue {me['runq']} > threshold {self.threshold:g}; probed {peer['name']} "
                                 f"with queue {peer['runq']}")]
        return []


class Age(Policy):
    """After Harchol-Balter & Downey (1997): CPU lifetimes are heavy-tailed, so a process that has
    run long will probably run long more. Migrate a process only when its CPU age exceeds the
    migration cost divided by the load difference, cost = a fixed part + resident size /
    `bandwidth` bytes per second. Loads are runnable processes per core of capacity, and only
    a node above one (someone waits) sheds. The oldest process goes to the least loaded peer
    (of equals, the one that last received a process longest ago).

    The fixed part is `base_cost` seconds, or, with cost=learned, what the cluster's last
    `history` migrations measured: the median of their frozen times less their size / bandwidth
    (`base_cost` until the first one is measured)."""
    name = "age"

    def __init__(self, base_cost=0.3, bandwidth=200e6, cost="fixed", history=10, **options):
        self.base_cost = float(base_cost)
        self.bandwidth = float(bandwidth)
        if cost not in ("fixed", "learned"):
            raise ValueError(f"cost must be fixed or learned, not {cost!r}")
        self.learned = cost == "learned"
        self.history = int(history)
        super().__init__(**options)

    def fixed_cost(self, view):
        """(seconds, how many measured migrations they come from)."""
        if self.learned:
            measured = [e for e in view.migrations if e["event"] == "done"][-self.history:]
            if measured:
                return max(0.0, statistics.median(e["frozen_s"] - e.get("rss", 0) / self.bandwidth
                                                  for e in measured)), len(measured)
        return self.base_cost, 0

    def decide(self, view):
        me = view.me
        peers = view.peers()
        if me["load"] <= 1.0 or not peers:
            return []
        # Among equally loaded peers the one that received a process longest ago: the guards
        # refuse a node that has just received one, and ties are common on small nodes.
        target = min(peers, key=lambda n: (n["load"], n.get("last_in", 0.0), n["name"]))
        difference = me["load"] - target["load"]
        if difference <= 0:
            return []
        fixed, measured = self.fixed_cost(view)
        source = f" (learned from {measured} migrations)" if measured else ""
        out = []
        for p in sorted(eligible(me), key=lambda p: -p["cpu_age"]):
            cost = fixed + p["rss"] / self.bandwidth
            needed = cost / difference
            if p["cpu_age"] > needed:
                out.append(proposal(me, p, target, f"age {p['cpu_age']:.2f} s > cost {cost:.2f} s{source} / load "
                                                   f"difference {difference:.2f} = {needed:.2f} s"))
        return out


class Memory(Policy):
    """Moves processes off a node whose free memory is below `low` (a fraction of its total),
    the largest first, to the peer with the most free memory that stays above its own low-water
    mark after taking the process."""
    name = "memory"

    def __init__(self, low=0.1, **options):
        self.low = float(low)
        super().__init__(**options)

    def decide(self, view):
        me = view.me
        if me["mem_free"] >= self.low * me["mem_total"]:
            return []
        out = []
        for p in sorted(eligible(me), key=lambda p: -p["rss"]):
            room = [n for n in view.peers() if n["mem_free"] - p["rss"] >= self.low * n["mem_total"]]
            if room:
                target = max(room, key=lambda n: (n["mem_free"], n["name"]))
                out.append(proposal(me, p, target, f"free memory {me['mem_free'] >> 20} MiB < {self.low:g} of "
                                                   f"{me['mem_total'] >> 20} MiB; {target['name']} has "
                                                   f"{target['mem_free'] >> 20} MiB free", metric="memory"))
        return out


SHIPPED = {cls.name: cls for cls in (Policy, Threshold, Age, Memory)}


def load(spec, options=None):
    """An instance of the policy named by `spec` (see the module's documentation)."""
    options = dict(options or {})
    cls = SHIPPED.get(spec)
    if cls is None:
        cls = _import(spec)
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise UmigError(f"policy {spec}: bad option: {e}") from None


def _import(spec):
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
    else:
        where, _, attr = spec.rpartition(".")
    if not where or not attr:
        raise UmigError(f"unknown policy {spec!r}: give one of {', '.join(SHIPPED)} or module:Class")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(f"umig_policy_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, attr)
    except (ImportError, AttributeError, OSError) as e:
        raise UmigError(f"cannot load policy {spec!r}: {e}") from None
    if not callable(getattr(cls, "decide", None)):
        raise UmigError(f"policy {spec!r} has no decide(view) method")
    return cls
