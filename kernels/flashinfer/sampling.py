"""sample on FlashInfer's rejection sampler (no vocabulary sort), backend `flashinfer`; select it explicitly.

Same filters as the native: temperature, then top-k, top-p and min-p, each judged on the full softmax. min-p
is applied first as a mask, and the kept probabilities are renormalized with top_p divided by the kept
mass, which keeps the top-p cut where the native puts it (the dropped tokens are the least likely ones).

Randomness: the native samples argmax(probs / noise) with Exp(1) noise drawn per request by the caller.
FlashInfer draws its own uniforms (Philox), so `noise` only supplies the step's seed (the bits of its first
two entries, a device tensor: no host sync, safe in CUDA graphs) and marks greedy rows. FlashInfer seeds a
whole batch with one seed, so per-request seeds reproduce only for the same batch, not across batchings.
Greedy rows (temperature 0, or noise None) are the exact argmax, as in the native.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.primitives import filters_or_off

common = load_sibling(__file__, "_common")


@torch.library.custom_op("nanovllm_fi::sample", mutates_args=())
def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    from flashinfer.sampling import top_k_top_p_sampling_from_probs

    probs = (logits.float() / temperature.clamp_min(1e-5).unsqueeze(1)).softmax(dim=-1)
    probs = probs * (probs >= min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True))
    kept = probs.sum(dim=-1)
    probs = probs / kept.unsqueeze(1)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).int()
    seed = noise[0, :2].float().clone().view(torch.int64)  # 64 bits of the step's entropy, shape (1,)
    sampled = top_k_top_p_sampling_from_probs(probs, k, (top_p / kept).float(), filter_apply_order="joint",
                                              seed=seed, offset=torch.zeros_like(seed))
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled.long())


@_sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, noise):
    return logits.new_empty(logits.shape[0], dtype=torch.long)


@register_impl("sample", "flashinfer", devices=("cuda",), needs=common.unavailable)
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
        return logits.argmax(dim=-1)
    top_k, top_p, min_p = filters_or_off(top_k, top_p, min_p, temperature)
    return torch.ops.nanovllm_fi.sample(logits, temperature, top_k, top_p, min_p, noise)
