"""Device slots for Hydra sweeps run in parallel: each worker process of `hydra/launcher=parallel` owns one slot
for its whole life, and on a machine with GPUs the slot is one GPU (`CUDA_VISIBLE_DEVICES`), so concurrent jobs
never share a card.

The joblib launcher reuses its worker processes across jobs, and CUDA reads `CUDA_VISIBLE_DEVICES` only once per
process, so a GPU cannot follow the job's index: a worker's second job would stay on its first job's card, and
two jobs that happen to run together could land on the same one. Instead each worker takes the first free slot
with an exclusive lock on `<sweep dir>/.device_slots/<k>.lock`, held until the worker exits (the OS releases it
then, also when the worker dies). With `n_jobs` equal to the number of slots, a free slot always exists.

Each job's output dir gets `device_slot.json` (slot, GPU, process id, start and end times); results.json and
experiments/aggregate.py are unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

SLOT_ENV = "NANOVLLM_DEVICE_SLOT"  # the job's slot index, on every device (on a CPU the only pinning there is)
RESOLVER = "nanovllm.sweep_slots"


def visible_gpus(gpus=None) -> list[str]:
    """The GPUs jobs are spread over: `gpus` if given (a list, or a comma-separated string), else the parent's
    CUDA_VISIBLE_DEVICES, else every GPU torch sees; [] on a machine without one."""
    if gpus is None:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is None:
            import torch

            return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(gpus, str):
        gpus = [g for g in gpus.split(",") if g.strip()]
    return [str(g).strip() for g in gpus]


def sweep_slots(gpus=None) -> int:
    """How many jobs run at once by default: one per GPU, or 1 on a machine without a GPU (CPU jobs each use
    every core; set hydra.launcher.n_jobs to run several)."""
    return max(1, len(visible_gpus(gpus)))


def register_sweep_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda gpus=None: sweep_slots(gpus))


_held: tuple[int, int] | None = None  # (slot, lock fd) of this process, kept until it exits


def claim_slot(lock_dir: Path, n_slots: int) -> int:
    """The slot this process owns: the one it took before, else the first of `n_slots` no live process holds."""
    global _held
    if _held is not None:
        return _held[0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(600):  # a worker that just exited may take a moment to release its lock
        for slot in range(n_slots):
            fd = os.open(lock_dir / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held = (slot, fd)
            return slot
        time.sleep(0.1)
    raise RuntimeError(f"no free device slot among {n_slots} in {lock_dir}: more workers than "
                       "hydra.launcher.n_jobs?")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra-core is a dependency; this keeps the module importable for its helpers alone
    Callback = object


class DeviceSlot(Callback):
    """Hydra callback (configs/hydra/launcher/parallel.yaml): pins each job to its worker's slot before the job
    runs. `gpus`: the GPU ids to spread over (null: the parent's CUDA_VISIBLE_DEVICES, else all)."""

    def __init__(self, gpus=None):
        self.gpus = visible_gpus(gpus)  # resolved in the launching process, before any worker exists

    def on_job_start(self, config, **kwargs) -> None:
        n_slots = int(config.hydra.launcher.get("n_jobs", 1) or 1)
        if n_slots < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_slots}: the parallel launcher needs a positive count")
        slot = claim_slot(Path(config.hydra.sweep.dir) / ".device_slots", n_slots)
        os.environ[SLOT_ENV] = str(slot)
        gpu = None
        if self.gpus:
            gpu = self.gpus[slot % len(self.gpus)]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible not in (None, gpu) and _cuda_started():
                raise RuntimeError(f"this worker already uses CUDA_VISIBLE_DEVICES={visible}; cannot move to {gpu}")
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        self._record = dict(slot=slot, gpu=gpu, pid=os.getpid(), started=time.time())
        self._write(config)

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        if getattr(self, "_record", None) is not None:
            self._record["finished"] = time.time()
            self._write(config)

    def _write(self, config) -> None:
        out = Path(config.hydra.runtime.output_dir) / "device_slot.json"
        out.write_text(json.dumps(self._record))


def _cuda_started() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
