"""A job trace for the scheduling experiment, the same for every policy: Poisson arrivals,
heavy-tailed (Pareto) CPU demands, arrivals skewed towards one node, all from one seed.

Harchol-Balter & Downey measured UNIX CPU lifetimes with P(lifetime > t) ~ 1/t for t above a
second: a Pareto tail with alpha near 1. `alpha` and the minimum `xm` set the tail; `cap`
bounds the longest job so that a run ends in minutes.

The arrival rate is set by `utilisation`: the work offered per second of the arrival period,
as a fraction of the cluster's `capacity` (cores), using the trace's own mean demand. Below
one the cluster can carry the load on average; whether a node is overloaded depends on how
the arrivals are spread (`weights`, one per node). Demands, nodes and arrival times come
from separate random streams, so the same seed gives the same jobs at any utilisation.
"""
import argparse
import json
import random
import statistics


def generate(seed=1, jobs=24, utilisation=0.7, capacity=1.6, alpha=1.1, xm=0.25, cap=8.0,
             weights=(0.6, 0.2, 0.1, 0.1)):
    if not 0 < utilisation:
        raise ValueError(f"utilisation must be above 0, not {utilisation}")
    demand_rng, node_rng, arrival_rng = (random.Random(f"{seed}-{stream}") for stream in ("demand", "node", "arrival"))
    demands = [min(cap, xm / (1.0 - demand_rng.random()) ** (1.0 / alpha)) for _ in range(jobs)]
    mean_gap = statistics.mean(demands) / (utilisation * capacity)
    t, trace = 0.0, []
    for i, demand in enumerate(demands):
        t += arrival_rng.expovariate(1.0 / mean_gap)
        node = node_rng.choices(range(len(weights)), weights)[0]
        trace.append({"id": i, "arrival": round(t, 3), "node": node, "demand": round(demand, 3)})
    return trace


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--utilisation", type=float, default=0.7)
    p.add_argument("--capacity", type=float, default=1.6, help="cores of the whole cluster")
    p.add_argument("--alpha", type=float, default=1.1)
    p.add_argument("--xm", type=float, default=0.25)
    p.add_argument("--cap", type=float, default=8.0)
    args = p.parse_args()
    print(json.dumps(generate(args.seed, args.jobs, args.utilisation, args.capacity, args.alpha, args.xm, args.cap),
                     indent=1))


if __name__ == "__main__":
    main()
