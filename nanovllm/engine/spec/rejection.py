"""Which drafted tokens a verify step keeps, and the token that follows them.

Row j of a sequence's verify logits is the target's distribution p_j of the token after its j-th input (input
0 is the last token already kept, inputs 1..n the drafts d_1..d_n). Greedy rows keep drafts while each equals
argmax p_{j-1}, then take argmax p_a: the same tokens as plain greedy decoding. Sampled rows use rejection
sampling: draft d_j, proposed with probability q_{j-1}(d_j), is kept with probability
min(1, p_{j-1}(d_j) / q_{j-1}(d_j)); at the first rejection the replacement is drawn from
normalize(max(0, p - q)); when every draft is kept a bonus token is drawn from p_n. Each emitted token is then
distributed exactly as p (Leviathan et al. 2023; Chen et al. 2023). Drafts with no distribution of their own
(prompt lookup, the oracle, greedy draft models) have q one-hot at the draft.

p is what the plain sampler samples from: softmax(logits / temperature) after top-k, top-p and min-p
(`target_probs` mirrors ops.primitives.sample). All of it runs on the device with no host sync.
"""

from __future__ import annotations

import torch

from nanovllm.ops.verify_ops import greedy_accept


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                 top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """(rows, vocab) float32 probabilities the sampler draws from: temperature, then top-k / top-p / min-p
    (a filter passed as None is off for every row; top_k <= 0, top_p 1, min_p 0 are off for one row)."""
    scaled = logits.float() / temperature.clamp_min(1e-5).unsqueeze(1)
    if top_k is None and top_p is None and min_p is None:
        return scaled.softmax(dim=-1)
    vocab = logits.shape[-1]
    top_k = torch.full_like(temperature, -1, dtype=torch.int64) if top_k is None else top_k
    top_p = torch.ones_like(temperature) if top_p is None else top_p
    min_p = torch.zeros_like(temperature) if min_p is None else min_p
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = rank >= torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    filtered = torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    return filtered.softmax(dim=-1)


def accept(logits: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor, temperature: torch.Tensor,
           filters: tuple = (None, None, None), uniform: torch.Tensor | None = None,
           noise: torch.Tensor | None = None,
           draft_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of drafts kept (B,), the token after them (B,)) for a batch of verify rows.

    logits:      (B, k + 1, V) the target's logits at each sequence's k + 1 inputs
    drafts:      (B, k) int64 drafted tokens; row i's entries past num_drafts[i] are ignored
    num_drafts:  (B,) int64 real drafts per row (0..k)
    temperature: (B,) float32; 0 is greedy
    filters:     (top_k, top_p, min_p) per row, or None each (see target_probs)
    uniform:     (B, k) U[0, 1) draws for the acceptance tests; noise: (B, V) Exp(1) draws for the final token
                 (both needed when a row samples)
    draft_probs: (B, k, V) the proposer's distributions q; None: one-hot at each draft
    """
    b, k1, vocab = logits.shape
    k = k1 - 1
    greedy_kept, greedy_next = greedy_accept(logits.argmax(dim=-1), drafts, num_drafts)
    if uniform is None or bool((temperature == 0).all()):
        return greedy_kept, greedy_next
    top_k, top_p, min_p = filters

    def per_position(x):
        return None if x is None else x.repeat_interleave(k1)

    p = target_probs(logits.reshape(b * k1, vocab), temperature.repeat_interleave(k1), per_position(top_k),
                     per_position(top_p), per_position(min_p)).view(b, k1, vocab)
    p_draft = p[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
    valid = torch.arange(k, device=logits.device).unsqueeze(0) < num_drafts.unsqueeze(1)
    ok = (uniform * q_draft < p_draft) & valid
    kept = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(b, device=logits.device)
    p_next = p[rows, kept]  # (B, V): the distribution of the token after the kept drafts
    rejected = kept < num_drafts
    if draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter_(1, drafts.gather(1, kept.clamp(max=k - 1).unsqueeze(1)), 1.0)
    else:
        q_next = draft_probs[rows, kept.clamp(max=k - 1)]
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(dim=1, keepdim=True)
    # A rejected draft had p < q somewhere, so the residual has mass; the guard only keeps rounding safe.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    final = torch.where(rejected.unsqueeze(1), residual, p_next)
    sampled_next = (final / noise).argmax(dim=1)
    is_greedy = temperature == 0
    return torch.where(is_greedy, greedy_kept, kept), torch.where(is_greedy, greedy_next, sampled_next)
