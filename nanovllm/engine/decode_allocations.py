"""Counts the device allocations a running engine makes over many decode steps (the memory pool's bar: none
in a decode step through the CUDA graphs). Used by tests/engine/test_decode_allocations_gpu.py and
`benchmarks/memory_report.py --decode-steps N`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanovllm.sampling_params import SamplingParams

PROMPT_TOKENS = 8


def cuda_counters() -> dict[str, int]:
    """The CUDA caching allocator's cumulative allocation and segment counts (after a sync)."""
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    return {"allocations": stats.get("allocation.all.allocated", 0),
            "segments": stats.get("segment.all.allocated", 0)}


@dataclass(frozen=True)
class DecodeAllocations:
    batch: int
    sampling: str  # the step mode's sampling (engine/step_mode.py) of the measured steps
    graph: bool  # whether the measured steps replayed the decode graphs
    steps: int
    before: dict[str, int]
    after: dict[str, int]

    @property
    def delta(self) -> dict[str, int]:
        return {k: self.after[k] - self.before[k] for k in self.before}

    @property
    def allocation_free(self) -> bool:
        return not any(self.delta.values())


def measure(engine, batch: int, params: SamplingParams, steps: int, warmup_steps: int = 8,
            counters: Callable[[], dict[str, int]] | None = None) -> DecodeAllocations:
    """Starts `batch` requests that outlive the measurement, runs `warmup_steps` engine steps (prefill, graph
    capture of the batch size, the first decode steps), then reads `counters` before and after `steps` more
    engine steps (decode only), and aborts the requests. The engine must have no other request. counters:
    cumulative counts to compare (default: the CUDA allocator's, `cuda_counters`)."""
    counters = counters or cuda_counters
    if engine.has_unfinished():
        raise ValueError("measure() needs an idle engine: its steps must be this batch's decode steps only")
    need = PROMPT_TOKENS + warmup_steps + steps + 4
    if need > engine.config.max_model_len:
        raise ValueError(f"{steps} decode steps after {warmup_steps} warm-up steps need max_model_len >= {need}, "
                         f"the engine has {engine.config.max_model_len}")
    params = SamplingParams(**{**vars(params), "max_tokens": need - PROMPT_TOKENS, "ignore_eos": True})
    ids = [engine.add_request([(7 * i + j) % 97 + 3 for j in range(PROMPT_TOKENS)], params) for i in range(batch)]
    runner, modes = engine.runner, []
    step_mode = runner.step_mode
    try:
        for _ in range(warmup_steps):
            engine.step()
        runner.step_mode = lambda b: modes.append(step_mode(b)) or modes[-1]  # the modes of the measured steps
        before = counters()
        for _ in range(steps):
            engine.step()
        after = counters()
    finally:
        vars(runner).pop("step_mode", None)
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished() or engine.scheduler.in_flight is not None:  # drain a step launched ahead
            engine.step()
    sampling = "/".join(sorted({m.sampling for m in modes}))
    return DecodeAllocations(batch, sampling, bool(modes) and all(m.graph for m in modes), steps, before, after)
