"""Rejection sampling keeps the target distribution exactly: over many samples on a small vocabulary, each
emitted token is distributed as the plain sampler's p (temperature, top-k, top-p), whatever was drafted."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from nanovllm.engine.spec.rejection import accept, target_probs
from nanovllm.ops.primitives import sample

VOCAB, K, N = 6, 2, 200_000


def draws(n: int, gen: torch.Generator):
    return torch.rand(n, K, generator=gen), torch.empty(n, VOCAB).exponential_(generator=gen)


def check(observed: torch.Tensor, expected: torch.Tensor) -> None:
    """Counts per token against probabilities: chi-square over p's support, total variation distance, and no
    token outside the support."""
    counts = torch.bincount(observed, minlength=VOCAB).double()
    probs = expected.double()
    assert counts[probs == 0].sum() == 0, "a token outside p's support was emitted"
    support = probs > 0
    f_exp = probs[support] / probs[support].sum() * counts.sum()
    if int(support.sum()) > 1:
        assert chisquare(counts[support].numpy(), f_exp.numpy()).pvalue > 1e-3
    # total variation: its sampling error scales as sqrt(vocab / samples)
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() < 2 * (VOCAB / counts.sum()) ** 0.5


@pytest.mark.parametrize("filters", [(None, None, None), (torch.tensor([4]), torch.tensor([0.9]), None),
                                     (None, None, torch.tensor([0.05]))], ids=["plain", "top_k_top_p", "min_p"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("drafted", ["likely", "unlikely", "random"])
def test_emitted_tokens_follow_target(filters, temperature, drafted):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, K + 1, VOCAB, generator=gen) * 2
    temp = torch.full((1,), temperature)
    p = target_probs(logits[0], temp.expand(K + 1), *[None if f is None else f.expand(K + 1) for f in filters])
    if drafted == "random":
        drafts = torch.randint(VOCAB, (N, K), generator=gen)
    else:
        pick = p[:K].argmax(dim=-1) if drafted == "likely" else p[:K].argmin(dim=-1)
        drafts = pick.expand(N, K).clone()
    uniform, noise = draws(N, gen)
    filt = tuple(None if f is None else f.expand(N) for f in filters)
    kept, following = accept(logits.expand(N, -1, -1), drafts, torch.full((N,), K), temp.expand(N), filt,
                             uniform, noise)
    first = torch.where(kept > 0, drafts[:, 0], following)
    check(first, p[0])
    # given the first draft was kept, the second emitted token follows p_1
    second = torch.where(kept > 1, drafts[:, 1], following)[kept > 0]
    if len(second) > 5000:
        check(second, p[1])
    # when every draft is kept the bonus token follows p_K
    if (kept == K).sum() > 5000:
        check(following[kept == K], p[K])


def test_with_draft_distributions():
    """A proposer that samples its drafts from q of its own: still exactly p."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, K + 1, VOCAB, generator=gen)
    q = torch.randn(K, VOCAB, generator=gen).softmax(dim=-1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=gen) for j in range(K)], dim=1)
    uniform, noise = draws(N, gen)
    kept, following = accept(logits.expand(N, -1, -1), drafts, torch.full((N,), K), torch.ones(N),
                             (None, None, None), uniform, noise, draft_probs=q.expand(N, -1, -1))
    check(torch.where(kept > 0, drafts[:, 0], following), logits[0, 0].softmax(dim=-1))


def test_target_probs_match_the_sampler():
    """target_probs is the distribution ops.primitives.sample draws from."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, VOCAB, generator=gen) * 2
    t, top_k, top_p = torch.tensor([0.8]), torch.tensor([4]), torch.tensor([0.85])
    noise = torch.empty(N, VOCAB).exponential_(generator=gen)
    n = N
    tokens = sample(logits.expand(n, -1), t.expand(n), top_k.expand(n), top_p.expand(n), None, noise)
    check(tokens, target_probs(logits, t, top_k, top_p, None)[0])


def test_greedy_rows_keep_the_argmax_prefix():
    logits = torch.zeros(3, K + 1, VOCAB)
    logits[:, 0, 2] = logits[:, 1, 4] = logits[:, 2, 1] = 5.0
    drafts = torch.tensor([[2, 4], [2, 3], [5, 4]])
    kept, following = accept(logits, drafts, torch.tensor([2, 2, 1]), torch.zeros(3))
    assert kept.tolist() == [2, 1, 0]
    assert following.tolist() == [1, 4, 2]
