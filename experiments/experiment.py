"""The scheduling experiment: job traces replayed under each policy on emulated nodes
(experiments/emulation.py), with every agent running the policy; one trace per seed, the same
trace for every policy.

Per policy and seed: mean slowdown (response time / CPU demand), mean response time,
makespan, the number of migrations and their total frozen time; across seeds each policy's
mean and standard deviation, and the change of mean slowdown against no migration and
against the placement-only threshold policy, taken seed by seed. Printed as tables and
written as JSON (with every job and every migration) and a PNG plot. Needs root
(namespaces, cgroups, ptrace).

  python experiments/experiment.py                 # the default run (about nine minutes)
  python experiments/experiment.py --long          # more jobs and seeds (about 22 minutes)
  python experiments/experiment.py --quick         # a smoke test (under a minute)
  python experiments/experiment.py --seeds 4 5 --policies none age --utilisation 0.5
  python experiments/experiment.py --guard node_interval=0.5   # guards as umig agent --guard
  python experiments/experiment.py --report results/results.json   # the tables of an earlier run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import jobtrace  # noqa: E402
from emulation import EmulatedCluster  # noqa: E402

POLICIES = ("none", "threshold", "age", "memory")
# Policies run with options, by the name the results give them.
VARIANTS = {"age-learned": ["--balance", "age", "--balance-opt", "cost=learned"]}
# Four identical nodes with most arrivals at node-a, and on average 70 % of the cluster's
# capacity offered: a load the cluster can carry, though node-a alone cannot.
DEFAULT = dict(seeds=[1, 2, 3], jobs=24, utilisation=0.7, alpha=1.1, xm=0.25, cap=8.0,
               weights=[0.6, 0.2, 0.1, 0.1], capacities=[0.4, 0.4, 0.4, 0.4], interval=0.5)
LONG = dict(DEFAULT, seeds=[1, 2, 3, 4, 5], jobs=40)
QUICK = dict(DEFAULT, seeds=[1], jobs=8, xm=0.1, cap=1.0, weights=[0.7, 0.2, 0.1], capacities=[0.4, 0.6, 0.4])
JOB = os.path.join(HERE, "cpu_job.py")
POLL_S = 1.0  # how often the driver asks about unfinished jobs: their times come from the agents


def calibrate():
    out = subprocess.run([sys.executable, JOB, "--calibrate"], capture_output=True, text=True, check=True).stdout
    return int(out)


def wait_for(predicate, timeout, what, poll=0.2):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def host_busy_s():
    """CPU seconds the whole host has spent busy since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def start_agents(cluster, policy, params, out_dir, env):
    agents = []
    for i, (name, ep) in enumerate(zip(cluster.names, cluster.endpoints)):
        with open(os.path.join(out_dir, f"agent-{name}.log"), "w") as log:
            guards = [a for g in params.get("guards", ()) for a in ("--guard", g)]
            cmd = cluster.agent_prefix(i, *cluster.peers_of(i), "--interval", params["interval"], *guards,
                                       *VARIANTS.get(policy, ["--balance", policy]))
            agents.append(subprocess.Popen(cmd + [sys.executable, "-m", "umig", "agent", "--listen", ep, "--name", name],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env))
    return agents


def own_migrations(cluster):
    """Every migration each agent started, as it reported them (from, to, job, frozen time, the
    process's CPU age and resident size when it left)."""
    from umig import jobs
    found = []
    for name, ep in zip(cluster.names, cluster.endpoints):
        events = jobs.request(ep, "nodes", "nodes", timeout=5)["events"]
        found += [e for e in events if e["from"] == name and e["event"] in ("done", "failed")]
    return sorted(found, key=lambda e: e["time"])


def agent_cpu_s(agent):
    """CPU seconds the agent process itself used (its children, jobs and migrations, not counted)."""
    import psutil
    try:
        times = psutil.Process(agent.pid).cpu_times()
        return times.user + times.system
    except psutil.Error:
        return None


def run_policy(cluster, policy, trace, params, rate, out_dir):
    from umig import jobs
    from umig.errors import UmigError
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    agents = start_agents(cluster, policy, params, out_dir, env)
    try:
        def joined():
            try:
                return all(len(jobs.request(ep, "nodes", "nodes", timeout=2)["nodes"]) == len(cluster.names)
                           for ep in cluster.endpoints)
            except UmigError:
                return False
        wait_for(joined, 60, "the agents to see each other")
        usage_before, busy_before, started = cluster.cpu_used_s(), host_busy_s(), time.time()
        submitted = []
        for job in sorted(trace, key=lambda j: j["arrival"]):
            time.sleep(max(0.0, started + job["arrival"] - time.time()))
            stem = os.path.join(out_dir, f"job-{job['id']}")
            record = jobs.request(cluster.endpoints[job["node"]], "run", "started",
                                  argv=[sys.executable, JOB, str(max(1, int(job["demand"] * rate)))], cwd=out_dir,
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                  stdout=stem + ".out", stderr=stem + ".err")
            submitted.append((job, record["job"], cluster.endpoints[job["node"]]))
        finals = {}

        def all_done():
            dead = [cluster.names[i] for i, a in enumerate(agents) if a.poll() is not None]
            if dead:
                raise RuntimeError(f"agent {', '.join(dead)} died: see {out_dir}")
            for job, name, origin in submitted:
                if name not in finals:
                    record = jobs.request(origin, "job", "job", job=name)
                    if record["state"] == "exited":
                        finals[name] = record
            return len(finals) == len(submitted)
        wait_for(all_done, 900, "every job to end", poll=POLL_S)
        elapsed = time.time() - started
        nodes_cpu_s, host_cpu_s = cluster.cpu_used_s() - usage_before, host_busy_s() - busy_before
        migrations = own_migrations(cluster)
        agents_cpu_s = [agent_cpu_s(a) for a in agents]
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            try:
                a.wait(10)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait()
        cluster.kill_all()
    rows = []
    for job, name, _ in submitted:
        final = finals[name]
        with open(os.path.join(out_dir, f"job-{job['id']}.out")) as f:
            complete = f.read().startswith("done ")
        response = final["finished"] - final["started"]
        rows.append({"id": job["id"], "node": job["node"], "demand": job["demand"], "response": response,
                     "slowdown": response / job["demand"], "ended": final["ended"], "ran_on": final["node"],
                     "complete": complete, "job": name})
    done = [m for m in migrations if m["event"] == "done"]
    failed = [r for r in rows if r["ended"] != ["status", 0] or not r["complete"]]
    return {"policy": policy, "mean_slowdown": statistics.mean(r["slowdown"] for r in rows),
            "mean_response_s": statistics.mean(r["response"] for r in rows),
            "makespan_s": max(finals[n]["finished"] for _, n, _ in submitted) - started,
            "migrations": len(done), "failed_migrations": len(migrations) - len(done),
            "frozen_s": sum(m["frozen_s"] for m in done), "failed_jobs": len(failed),
            # Where the CPU went while the jobs ran: the nodes' cgroups (jobs, agents, migrations)
            # against the whole host, whose excess is other work sharing the machine.
            "elapsed_s": elapsed, "nodes_cores": nodes_cpu_s / elapsed, "host_cores": host_cpu_s / elapsed,
            "agents_cpu_s": agents_cpu_s, "migration_log": migrations, "jobs": rows}


# --------------------------------------------------------------------------- reports

METRICS = (("mean_slowdown", "mean slowdown", "{:.2f}"), ("mean_response_s", "mean response (s)", "{:.2f}"),
           ("makespan_s", "makespan (s)", "{:.1f}"), ("migrations", "migrations", "{:.0f}"),
           ("frozen_s", "frozen total (s)", "{:.2f}"))


def spread(values, fmt):
    """'mean ± standard deviation' (just the value for one)."""
    if len(values) == 1:
        return fmt.format(values[0])
    unsigned = fmt.replace("+", "")  # a spread has no sign
    return f"{fmt.format(statistics.mean(values))} ± {unsigned.format(statistics.stdev(values))}"


def change(runs, policy, baseline):
    """Per seed, the relative change of mean slowdown of `policy` against `baseline`."""
    return [by_policy[policy]["mean_slowdown"] / by_policy[baseline]["mean_slowdown"] - 1
            for by_policy in runs.values() if policy in by_policy and baseline in by_policy]


def tables(runs, policies):
    """Markdown: one table per seed, then the summary across seeds."""
    out = []
    for seed, by_policy in runs.items():
        out += [f"seed {seed}:", "", "| policy | " + " | ".join(label for _, label, _ in METRICS)
                + " | failed jobs | host cores busy |", "|---" * (len(METRICS) + 3) + "|"]
        for policy in policies:
            r = by_policy[policy]
            out.append(f"| {policy} | " + " | ".join(fmt.format(r[key]) for key, _, fmt in METRICS)
                       + f" | {r['failed_jobs']} | {r['host_cores']:.2f} |")
        out.append("")
    out += [f"across {len(runs)} seed(s), mean ± standard deviation:", "",
            "| policy | " + " | ".join(label for _, label, _ in METRICS) + " | slowdown vs none | vs threshold |",
            "|---" * (len(METRICS) + 3) + "|"]
    for policy in policies:
        cells = [spread([by_policy[policy][key] for by_policy in runs.values()], fmt) for key, _, fmt in METRICS]
        against = [spread([100 * c for c in change(runs, policy, base)], "{:+.0f}") + " %"
                   if policy != base and change(runs, policy, base) else "" for base in ("none", "threshold")]
        out.append(f"| {policy} | " + " | ".join(cells + against) + " |")
    return "\n".join(out)


def migration_costs(runs, policies):
    """Markdown: what the moves cost against what the moved jobs needed, all seeds together."""
    out = ["migrations, all seeds together (medians; frozen: the moved process could not run):", "",
           "| policy | moves | frozen (s) | frozen, min–max (s) | CPU age at the move (s) | moved job's demand (s) "
           "| frozen / demand | moves of jobs under 1 s |", "|---" * 8 + "|"]
    for policy in policies:
        moves = []
        for by_policy in runs.values():
            demand = {j["job"]: j["demand"] for j in by_policy[policy]["jobs"]}
            moves += [(m, demand[m["job"]]) for m in by_policy[policy]["migration_log"] if m["event"] == "done"]
        if not moves:
            continue
        frozen = [m["frozen_s"] for m, _ in moves]
        out.append(f"| {policy} | {len(moves)} | {statistics.median(frozen):.2f} "
                   f"| {min(frozen):.2f}–{max(frozen):.2f} "
                   f"| {statistics.median(m['age'] for m, _ in moves):.2f} "
                   f"| {statistics.median(d for _, d in moves):.2f} "
                   f"| {statistics.median(m['frozen_s'] / d for m, d in moves):.2f} "
                   f"| {sum(d < 1 for _, d in moves)} |")
    return "\n".join(out)


def by_size(runs, policies, short=1.0):
    """Markdown: mean slowdown of short and long jobs, each seed's mean then mean ± sd across seeds."""
    out = [f"mean slowdown by job size (demand under {short:g} CPU s or not), mean ± sd across seeds:", "",
           "| policy | short jobs | long jobs |", "|---|---|---|"]
    for policy in policies:
        cells = []
        for is_short in (True, False):
            per_seed = [[j["slowdown"] for j in by_policy[policy]["jobs"] if (j["demand"] < short) == is_short]
                        for by_policy in runs.values()]
            means = [statistics.mean(s) for s in per_seed if s]  # a small trace may lack one kind
            cells.append(spread(means, "{:.2f}") if means else "no such job")
        out.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(runs, policies):
    return "\n\n".join((tables(runs, policies), by_size(runs, policies), migration_costs(runs, policies)))


COLOURS = ["#888", "#4a7", "#47a", "#a74", "#7a4"]


def plot(runs, policies, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.3 * len(METRICS), 3.2))
    for ax, (key, label, _) in zip(axes, METRICS):
        per_seed = [[by_policy[p][key] for by_policy in runs.values()] for p in policies]
        ax.bar(policies, [statistics.mean(v) for v in per_seed], color=COLOURS[:len(policies)],
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in per_seed], capsize=3)
        for x, values in enumerate(per_seed):  # each seed as a dot over its bar
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small trace on three nodes: a smoke test")
    size.add_argument("--long", action="store_true", help=f"{LONG['jobs']} jobs and {len(LONG['seeds'])} seeds")
    p.add_argument("--policies", nargs="+", default=list(POLICIES),
                   help=f"policies to compare (default: %(default)s; also {', '.join(VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, help="one trace per seed")
    p.add_argument("--jobs", type=int, help="jobs per trace")
    p.add_argument("--utilisation", type=float, help="work offered per second as a fraction of the cluster's cores")
    p.add_argument("--capacities", nargs="+", type=float, help="cores of each node (one node each)")
    p.add_argument("--weights", nargs="+", type=float, help="share of arrivals at each node")
    p.add_argument("--guard", dest="guards", action="append", metavar="KEY=VALUE",
                   help="a guard for every agent, as umig agent --guard takes it (repeat)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the results")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of an earlier run and return")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            runs = json.load(f)["runs"]
        print(report(runs, list(next(iter(runs.values())))))
        return 0
    params = dict(QUICK if args.quick else LONG if args.long else DEFAULT)
    for key in ("seeds", "jobs", "utilisation", "capacities", "weights", "guards"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if len(params["weights"]) != len(params["capacities"]):
        p.error(f"{len(params['weights'])} weights for {len(params['capacities'])} nodes: give one per node")
    if params["utilisation"] <= 0:
        p.error(f"--utilisation must be above 0, not {params['utilisation']:g}")
    rate = calibrate()
    capacity = sum(params["capacities"])
    traces = {seed: jobtrace.generate(seed, params["jobs"], params["utilisation"], capacity, params["alpha"],
                                      params["xm"], params["cap"], params["weights"]) for seed in params["seeds"]}
    print(f"{len(params['capacities'])} nodes of {params['capacities']} cores, utilisation {params['utilisation']:g}, "
          f"{rate} iterations per CPU second", flush=True)
    for seed, trace in traces.items():
        print(f"seed {seed}: {len(trace)} jobs, {sum(j['demand'] for j in trace):.1f} CPU s over "
              f"{trace[-1]['arrival']:.1f} s, per node "
              f"{[sum(1 for j in trace if j['node'] == k) for k in range(len(params['capacities']))]}", flush=True)
    cluster = EmulatedCluster(params["capacities"]).create()
    runs = {}
    try:
        cluster.enter_hub()
        for seed, trace in traces.items():
            for policy in args.policies:
                t = time.monotonic()
                runs.setdefault(seed, {})[policy] = run_policy(cluster, policy, trace, params, rate,
                                                               os.path.join(args.out, f"seed-{seed}", policy))
                print(f"seed {seed} {policy}: done in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        cluster.remove()
    print(report(runs, args.policies))
    summary = {"params": params, "calibration_iterations_per_cpu_s": rate, "traces": traces, "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report(runs, args.policies) + "\n")
    plot(runs, args.policies, os.path.join(args.out, "results.png"))
    print(f"results in {args.out}/results.json, results.md and results.png")
    return 1 if any(r["failed_jobs"] for by_policy in runs.values() for r in by_policy.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
