"""Wall time of one `-m` sweep under Hydra's sequential launcher and under `hydra/launcher=parallel`.

    python benchmarks/sweep_parallel.py --jobs 2 -- model=default           # on a 2-GPU machine: one job a GPU
    python benchmarks/sweep_parallel.py --jobs 4 --n-jobs 4 -- model=tiny device=cpu engine=cpu_small

Each sweep runs `python -m nanovllm.run -m <overrides> engine.seed=0,...,jobs-1` (the seed changes no work:
the benchmark decodes greedily, so every job does the same work) into a temporary folder. Prints both wall
times and `sweep_ratio` (parallel / sequential); `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Hydra overrides go after `--`.")
    p.add_argument("--jobs", type=int, default=2, help="jobs in the sweep")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="hydra.launcher.n_jobs of the parallel sweep (default: one per GPU)")
    p.add_argument("--out", type=Path, default=None, help="write the timings JSON here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after `--`)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def timed_sweep(overrides: list[str], sweep_dir: Path, jobs: int) -> float:
    cmd = [sys.executable, "-m", "nanovllm.run", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "NANOVLLM_PROGRESS": "0"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=sweep_dir.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    found = len(list(sweep_dir.rglob("results.json")))
    if found != jobs:
        raise SystemExit(f"{sweep_dir}: {found} results.json, expected one per job")
    return wall


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = "engine.seed=" + ",".join(str(i) for i in range(args.jobs))
    parallel = ["hydra/launcher=parallel", *([f"hydra.launcher.n_jobs={args.n_jobs}"] if args.n_jobs else [])]
    with tempfile.TemporaryDirectory(prefix="sweep_bench_") as tmp:
        sequential_s = timed_sweep([*args.overrides, seeds], Path(tmp) / "sequential", args.jobs)
        parallel_s = timed_sweep([*parallel, *args.overrides, seeds], Path(tmp) / "parallel", args.jobs)
    res = dict(jobs=args.jobs, n_jobs=args.n_jobs, overrides=args.overrides, sequential_s=round(sequential_s, 2),
               parallel_s=round(parallel_s, 2), sweep_ratio=round(parallel_s / sequential_s, 3))
    print(f"sequential {sequential_s:.1f} s, parallel {parallel_s:.1f} s, sweep_ratio {res['sweep_ratio']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
