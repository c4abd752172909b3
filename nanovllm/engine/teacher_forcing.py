"""Teacher forcing through the real engine path: prefill a prompt, then feed chosen tokens one decode
step at a time and collect the logits of every step. The oracle for comparing execution paths."""

from __future__ import annotations

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def teacher_forced_logits(engine, prompt_ids: list[int], forced_ids: list[int]) -> torch.Tensor:
    """(len(forced_ids) + 1, vocab) float32 logits: after the prompt, then after each forced token."""
    if engine.has_unfinished():
        raise RuntimeError("teacher forcing needs an idle engine")
    seq = Sequence(prompt_ids, SamplingParams(temperature=0, max_tokens=len(forced_ids) + 1))
    engine.scheduler.add(seq)
    out = []
    try:
        for forced in [*forced_ids, None]:
            batch = []
            while not any(item.completes for item in batch):  # chunked prefill may take several steps
                batch = engine.scheduler.schedule()
                logits = engine.runner.logits(batch)
                engine.scheduler.advance(batch)
            out.append(logits[0].float().cpu())
            if forced is not None:
                seq.token_ids.append(forced)
    finally:
        engine.scheduler.finish(seq, "abort")
    return torch.stack(out)
