"""A job trace for the scheduling experiment, the same for every policy: Poisson arrivals,
heavy-tailed (Pareto) CPU demands, arrivals skewed towards one node, all from one seed.

Harchol-Balter & Downey measured UNIX CPU lifetimes with P(lifetime > t) ~ 1/t for t above a
second: a Pareto tail with alpha near 1. `alpha` and the minimum `xm` set the tail; `cap`
bounds the longest job so that a run ends in minutes.
"""
import argparse
import json
import random


def generate(seed=1, jobs=40, duration=60.0, alpha=1.1, xm=0.25, cap=15.0, weights=(0.7, 0.2, 0.1)):
    rng = random.Random(seed)
    rate = jobs / duration
    t, trace = 0.0, []
    for i in range(jobs):
        t += rng.expovariate(rate)
        demand = min(cap, xm / (1.0 - rng.random()) ** (1.0 / alpha))
        node = rng.choices(range(len(weights)), weights)[0]
        trace.append({"id": i, "arrival": round(t, 3), "node": node, "demand": round(demand, 3)})
    return trace


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--alpha", type=float, default=1.1)
    p.add_argument("--xm", type=float, default=0.25)
    p.add_argument("--cap", type=float, default=15.0)
    args = p.parse_args()
    trace = generate(args.seed, args.jobs, args.duration, args.alpha, args.xm, args.cap)
    print(json.dumps(trace, indent=1))


if __name__ == "__main__":
    main()
