"""Sweeps on the Hydra launchers of configs/hydra/launcher/: `parallel` (joblib) runs a -m sweep's jobs in parallel
worker processes, each pinned to its own device slot (a GPU where there are GPUs), and experiments/aggregate.py
collects its jobs as it collects a sequential sweep's; `slurm` (submitit) composes with one GPU a job."""

from __future__ import annotations

import csv
import json
import multiprocessing
import subprocess
import sys

import pytest

from nanovllm.sweep import claim_slot, sweep_slots, visible_gpus
from tests.helpers import ROOT, subprocess_env

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs the [sweep] extra")

SMALL = ["model=tiny", "device=cpu", "engine=cpu_small", "bench.num_prompts=2", "bench.max_tokens=4",
         "bench.decode_tokens=6", "bench.prefill_len=32", "bench.warmup=1", "bench.repeats=1"]


def test_visible_gpus_from_a_list_the_environment_or_none(monkeypatch):
    assert visible_gpus("0, 2") == ["0", "2"] and visible_gpus([1, 3]) == ["1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert visible_gpus() == ["5", "6", "7"] and sweep_slots() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and sweep_slots() == 1  # no GPU: one job at a time unless n_jobs says more


def _claim(lock_dir, n_slots, out, release):
    out.put(claim_slot(lock_dir, n_slots))
    out.put(claim_slot(lock_dir, n_slots))  # a process keeps the slot it took
    release.wait(30)


def test_each_live_process_owns_a_distinct_slot(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim, args=(tmp_path, 3, out, release)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=30) for _ in range(6)]
    release.set()
    for p in procs:
        p.join(30)
    assert sorted(set(got)) == [0, 1, 2] and all(got.count(s) == 2 for s in (0, 1, 2))
    late = ctx.Process(target=_claim, args=(tmp_path, 3, out, release))  # the slots are free again once they exit
    late.start()
    assert out.get(timeout=30) == 0
    late.join(30)


def hydra_cfg(*overrides: str) -> str:
    p = subprocess.run([sys.executable, "-m", "nanovllm.run", *overrides, "--cfg", "hydra"], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_slurm_launcher_composes_with_one_gpu_a_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=tiny")
    assert "SlurmLauncher" in out and "gpus_per_node: 1" in out and "tasks_per_node: 1" in out
    assert "partition: gpu" in out


def test_parallel_launcher_sizes_its_pool_by_the_gpus():
    out = hydra_cfg("hydra/launcher=parallel", "hydra.callbacks.device_slot.gpus=[0,1,2]", "model=tiny")
    assert "JoblibLauncher" in out and "nanovllm.sweep.DeviceSlot" in out
    assert "n_jobs: ${nanovllm.sweep_slots:${hydra.callbacks.device_slot.gpus}}" in out  # resolved at launch


def test_parallel_sweep_runs_jobs_at_once_each_on_its_own_slot_and_aggregates(tmp_path):
    """Three jobs, three workers, two (pretend) GPUs: every job runs in its own worker process while the others
    run, on the GPU of its slot (slot 2 wraps round to the first GPU); aggregate.py reads the sweep as it reads a
    sequential one."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "nanovllm.run", "-m", "hydra/launcher=parallel",
                             "hydra.launcher.n_jobs=3", "hydra.callbacks.device_slot.gpus=[4,5]", *SMALL,
                             "bench.temperature=0.0,0.1,0.2", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    jobs = [json.loads((sweep / str(i) / "device_slot.json").read_text()) for i in range(3)]
    assert {j["slot"] for j in jobs} == {0, 1, 2}
    assert len({j["pid"] for j in jobs}) == 3 and proc.pid not in {j["pid"] for j in jobs}
    assert all(j["gpu"] == ["4", "5"][j["slot"] % 2] for j in jobs)  # CUDA_VISIBLE_DEVICES of the job
    assert max(j["started"] for j in jobs) < min(j["finished"] for j in jobs)  # all three ran at the same time

    summary = tmp_path / "summary"
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "aggregate.py"), str(sweep), "--out",
                        str(summary)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader((summary / "summary.csv").open()))
    assert [r["overrides"] for r in rows] == [f"bench.temperature=0.{i}" for i in range(3)]
    assert [r["run"] for r in rows] == ["0", "1", "2"] and all(float(r["decode_tok_s"]) > 0 for r in rows)
