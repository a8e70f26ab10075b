"""The scheduling experiment: one job trace, replayed under each policy on three emulated nodes
of unequal capacity (experiments/emulation.py), with every agent running the policy.

Per policy: mean slowdown (response time / CPU demand), mean response time, makespan, the
number of migrations and their total frozen time; printed as a table and written as JSON and
a PNG plot. Needs root (namespaces, cgroups, ptrace).

  python experiments/experiment.py            # the default run (several minutes)
  python experiments/experiment.py --quick    # a smoke test (under a minute)
"""
import argparse
import json
import os
import re
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
DEFAULT = dict(seed=1, jobs=30, duration=40.0, alpha=1.1, xm=0.25, cap=8.0, weights=(0.7, 0.2, 0.1),
               capacities=(0.4, 0.6, 0.4), interval=0.5)
QUICK = dict(DEFAULT, jobs=8, duration=4.0, xm=0.1, cap=1.0)
JOB = os.path.join(HERE, "cpu_job.py")
MIGRATED = re.compile(r"balance: migrated pid \d+ to (\S+) as pid \d+: frozen ([\d.]+) s")


def calibrate():
    out = subprocess.run([sys.executable, JOB, "--calibrate"], capture_output=True, text=True, check=True).stdout
    return int(out)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_policy(cluster, policy, trace, params, rate, out_dir):
    from umig import jobs
    from umig.errors import UmigError
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    agents, logs = [], []
    for i, (name, ep) in enumerate(zip(cluster.names, cluster.endpoints)):
        log_path = os.path.join(out_dir, f"agent-{name}.log")
        logs.append(log_path)
        with open(log_path, "w") as log:
            cmd = cluster.agent_prefix(i, *cluster.peers_of(i), "--interval", params["interval"], "--balance", policy)
            agents.append(subprocess.Popen(cmd + [sys.executable, "-m", "umig", "agent", "--listen", ep, "--name", name],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        def joined():
            try:
                return all(len(jobs.request(ep, "nodes", "nodes", timeout=2)["nodes"]) == len(cluster.names)
                           for ep in cluster.endpoints)
            except UmigError:
                return False
        wait_for(joined, 60, "the agents to see each other")
        started = time.time()
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
        wait_for(all_done, 900, "every job to end")
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
    frozen = []
    for path in logs:
        with open(path) as f:
            frozen += [float(m[2]) for m in MIGRATED.finditer(f.read())]
    rows = []
    for job, name, _ in submitted:
        final = finals[name]
        with open(os.path.join(out_dir, f"job-{job['id']}.out")) as f:
            complete = f.read().startswith("done ")
        response = final["finished"] - final["started"]
        rows.append({"id": job["id"], "node": job["node"], "demand": job["demand"], "response": response,
                     "slowdown": response / job["demand"], "ended": final["ended"], "ran_on": final["node"],
                     "complete": complete})
    failed = [r for r in rows if r["ended"] != ["status", 0] or not r["complete"]]
    return {"policy": policy, "mean_slowdown": statistics.mean(r["slowdown"] for r in rows),
            "mean_response_s": statistics.mean(r["response"] for r in rows),
            "makespan_s": max(finals[n]["finished"] for _, n, _ in submitted) - started,
            "migrations": len(frozen), "frozen_s": sum(frozen), "failed_jobs": len(failed), "jobs": rows}


def table(results):
    lines = ["| policy | mean slowdown | mean response (s) | makespan (s) | migrations | frozen total (s) | failed |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['policy']} | {r['mean_slowdown']:.2f} | {r['mean_response_s']:.2f} | {r['makespan_s']:.1f} "
                     f"| {r['migrations']} | {r['frozen_s']:.3f} | {r['failed_jobs']} |")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    names = [r["policy"] for r in results]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, key, label in zip(axes, ("mean_slowdown", "mean_response_s", "makespan_s", "migrations"),
                              ("mean slowdown", "mean response (s)", "makespan (s)", "migrations")):
        ax.bar(names, [r[key] for r in results], color=["#888", "#4a7", "#47a", "#a74"][:len(names)])
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small trace: a smoke test")
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the results")
    args = p.parse_args()
    params = dict(QUICK if args.quick else DEFAULT)
    if args.seed is not None:
        params["seed"] = args.seed
    trace = jobtrace.generate(params["seed"], params["jobs"], params["duration"], params["alpha"], params["xm"],
                              params["cap"], params["weights"])
    rate = calibrate()
    print(f"trace: {len(trace)} jobs, {sum(j['demand'] for j in trace):.1f} CPU s over {trace[-1]['arrival']:.1f} s, "
          f"per node {[sum(1 for j in trace if j['node'] == k) for k in range(3)]}; capacities {params['capacities']}; "
          f"{rate} iterations per CPU second", flush=True)
    cluster = EmulatedCluster(params["capacities"]).create()
    results = []
    try:
        cluster.enter_hub()
        for policy in args.policies:
            t = time.monotonic()
            results.append(run_policy(cluster, policy, trace, params, rate, os.path.join(args.out, policy)))
            print(f"{policy}: done in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        cluster.remove()
    print(table(results))
    summary = {"params": params, "calibration_iterations_per_cpu_s": rate, "trace": trace, "results": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, os.path.join(args.out, "results.png"))
    print(f"results in {args.out}/results.json and results.png")
    return 1 if any(r["failed_jobs"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
