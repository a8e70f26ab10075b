"""The decision loop: once per fresh load sample the agent asks its policy (umig/policies.py)
what to move, lets the guards veto what would thrash, and moves the first admitted process by
running `umig migrate PID TARGET --json` as a child, whose result it collects without blocking
its loop. One migration at a time leaves this node.

Every decision is logged with its reason, the loads seen and the process's age and size; a
proposal the guards refuse is logged once per process and reason.
"""
import collections
import json
import subprocess
import sys
import time

from umig import cluster, jobs, policies

EVENTS_KEPT = 50


class Guards:
    """Vetoes against thrashing. Times are wall-clock seconds (they travel between nodes).

    - a process that arrived less than `process_interval` ago stays (its arrival time travels
      with it as `moved_at`);
    - this node sends at most one process per `node_interval`, to a given node at most one per
      `node_interval`, and not to a node that received one within `node_interval`;
    - hysteresis: a load migration must leave the target's load, with the process, below the
      source's by more than `hysteresis`; a memory migration must leave the target more free
      memory than the source has;
    - a decision waits for samples of both nodes taken after this node's last migration ended
      (until then the view still shows the process where it was);
    - never two migrations of one process at a time;
    - a process whose migration failed cools down for `cooldown`.
    """

    def __init__(self, process_interval=10.0, node_interval=2.0, hysteresis=0.25, cooldown=30.0):
        self.process_interval = float(process_interval)
        self.node_interval = float(node_interval)
        self.hysteresis = float(hysteresis)
        self.cooldown = float(cooldown)
        self.in_flight = set()
        self.cooling = {}
        self.last_sent = float("-inf")
        self.last_sent_to = {}
        self.last_ended = float("-inf")

    @staticmethod
    def key(m):
        return m.job or f"{m.source}:{m.pid}"

    def refuse(self, m, view, now):
        """Why `m` must not start now, or None."""
        key = self.key(m)
        if key in self.in_flight:
            return "it is already being migrated"
        if self.cooling.get(key, float("-inf")) > now:
            return f"it is cooling down after a failed migration ({self.cooling[key] - now:.0f} s left)"
        me = view.me
        process = next((p for p in me.get("processes", ()) if p["pid"] == m.pid), None)
        if process is None or not process.get("eligible"):
            return "it is not an eligible process of this node"
        if now - process.get("moved_at", 0.0) < self.process_interval:
            return f"it arrived {now - process['moved_at']:.1f} s ago (minimum {self.process_interval:g} s)"
        if now - self.last_sent < self.node_interval:
            return f"this node sent a process {now - self.last_sent:.1f} s ago (minimum {self.node_interval:g} s)"
        target = view.nodes.get(m.target)
        if target is None or m.target == view.local:
            return f"node {m.target} is not a peer in the view"
        last_in = max(self.last_sent_to.get(m.target, float("-inf")), target.get("last_in", 0.0))
        if now - last_in < self.node_interval:
            return f"{m.target} received a process {now - last_in:.1f} s ago (minimum {self.node_interval:g} s)"
        stale = [n["name"] for n in (me, target) if n.get("time", float("inf")) <= self.last_ended]
        if stale:
            return f"no sample of {' and '.join(stale)} since the last migration ended"
        if m.metric == "memory":
            if target["mem_free"] - m.rss <= me["mem_free"]:
                return f"{m.target} would have less free memory than this node"
        else:
            gain = me["load"] - policies.load_after(target)
            if gain <= self.hysteresis:
                return (f"load {me['load']:.2f} here against {policies.load_after(target):.2f} on {m.target} with "
                        f"the process is within the hysteresis {self.hysteresis:g}")
        return None

    def started(self, m, now):
        self.in_flight.add(self.key(m))
        self.last_sent = now
        self.last_sent_to[m.target] = now

    def finished(self, m, ok, now):
        self.in_flight.discard(self.key(m))
        self.last_ended = now
        if not ok:
            self.cooling[self.key(m)] = now + self.cooldown


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def _load(node):
    return f"{node['name']} load {node['load']:.2f} ({node['runq']} runnable / {node['capacity']:g} cores)"


class Balancer:
    def __init__(self, agent, cluster_, jobs_, policy, guards):
        self.agent = agent
        self.cluster = cluster_
        self.jobs = jobs_
        self.policy = policy
        self.guards = guards
        self.running = None
        self.events = collections.deque(maxlen=EVENTS_KEPT)
        self._seen = 0
        self._refusals = {}  # guard key -> the last refusal logged

    @property
    def policy_name(self):
        return getattr(self.policy, "name", type(self.policy).__name__)

    def tick(self):
        if self.running:
            self._collect()
            return
        if self.cluster.node.seq == self._seen or self.policy_name == "none":
            return
        self._seen = self.cluster.node.seq
        view = self.cluster.view()
        try:
            proposals = list(self.policy.decide(view) or ())
        except Exception as e:  # a researcher's policy must not take the agent down
            self.agent.log(f"balance: policy {self.policy_name} failed: {type(e).__name__}: {e}")
            return
        for m in proposals:
            refusal = self.guards.refuse(m, view, view.now)
            if refusal is None:
                self._start(m, view)
                return
            if self._refusals.get(self.guards.key(m)) != refusal.split(" ", 3)[:3]:
                self._refusals[self.guards.key(m)] = refusal.split(" ", 3)[:3]
                self.agent.log(f"balance: not moving pid {m.pid} to {m.target} ({self.policy_name}: {m.reason}): "
                               f"{refusal}")

    def _start(self, m, view):
        target = view.nodes[m.target]
        job = self.jobs.by_pid(m.pid)
        age = self.jobs.cpu_age(job) if job else m.age
        self.agent.log(f"balance: moving pid {m.pid}{f' (job {job.id})' if job else ''} to {m.target}: policy "
                       f"{self.policy_name}: {m.reason}; {_load(view.me)}, {_load(target)}; CPU age {age:.2f} s, "
                       f"resident {_mib(m.rss)}")
        proc = subprocess.Popen([sys.executable, "-m", "umig", "migrate", str(m.pid), target["endpoint"], "--json"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.guards.started(m, view.now)
        if job:
            self.jobs.migrating(job)
        about = {"pid": m.pid, "job": m.job, "from": m.source, "to": m.target, "policy": self.policy_name,
                 "age": age, "rss": m.rss}
        self.running = (m, proc, job, age, target, about)
        self.events.append(dict(about, time=time.time(), event="start", reason=m.reason))

    def _collect(self):
        m, proc, job, age, target, about = self.running
        if proc.poll() is None:
            return
        self.running = None
        out, err = proc.communicate()
        info = None
        if proc.returncode == 0:
            try:
                info = json.loads(out)
            except ValueError:
                err = f"unreadable answer {out[:200]!r}"
        event = dict(about, time=time.time())
        if info:
            event.update(event="done", target_pid=info["target_pid"], frozen_s=info["frozen_s"],
                         total_s=info["total_s"])
            self.agent.log(f"balance: migrated pid {m.pid} to {m.target} as pid {info['target_pid']}: frozen "
                           f"{info['frozen_s']:.3f} s, total {info['total_s']:.3f} s")
        else:
            reason = (err.strip().splitlines() or ["no reason given"])[-1]
            event.update(event="failed", reason=reason)
            self.agent.log(f"balance: migrating pid {m.pid} to {m.target} failed: {reason}; it cools down for "
                           f"{self.guards.cooldown:g} s")
        self.events.append(event)
        self.guards.finished(m, info is not None, time.time())
        if job:
            self.jobs.migrated(job, info is not None, target["endpoint"], info and info["target_pid"], age)

    def stop(self):
        if self.running:
            self.running[1].kill()
            self.running[1].wait()


GUARD_OPTIONS = ("process_interval", "node_interval", "hysteresis", "cooldown")


def attach(agent, options):
    """Give an agent its scheduler: the job registry, the node's load (published when it has
    peers or is told where), the policy with its guards, and the `nodes` request."""
    peers = list(options.get("peers") or ())
    if options.get("cluster_file"):
        peers += cluster.read_peers(options["cluster_file"])
    publish = options.get("publish") or (cluster.publish_endpoint(agent.listen) if peers else None)
    node = cluster.Node(agent.name, agent.listen, rules=cluster.Rules(**options.get("rules", {})))
    registry = jobs.Jobs(agent, node.endpoint)
    node.jobs = registry
    view = cluster.Cluster(node, publish, peers, float(options.get("interval") or cluster.DEFAULT_INTERVAL),
                           float(options.get("node_timeout") or cluster.DEFAULT_TIMEOUT), log=agent.log)
    policy = policies.load(options.get("balance") or "none", options.get("balance_options"))
    guards = Guards(**{k: options[k] for k in GUARD_OPTIONS if options.get(k) is not None})
    balancer = Balancer(agent, view, registry, policy, guards)
    agent.tickers[:0] = [view.tick, balancer.tick]

    node.migrations = balancer.events  # published with every sample, for the peers' views

    def nodes(identity, meta):
        now = view.view()
        agent.reply(identity, "nodes", policy=balancer.policy_name, events=list(balancer.events),
                    migrations=cluster.recent_migrations(now.migrations, balancer.events), **now.to_json())
    agent.services["nodes"] = nodes
    if balancer.policy_name != "none":
        agent.log(f"balance: policy {balancer.policy_name}, peers {', '.join(view.peer_endpoints) or 'none'}")
    return balancer
