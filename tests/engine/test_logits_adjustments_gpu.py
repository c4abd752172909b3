"""On the GPU: the batched logits adjustments give the CPU's numbers, and building and applying them never
waits for the device (torch's sync debug mode turns any synchronizing call into an error)."""

from __future__ import annotations

import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.engine.logits_processing import LogitsAdjustment
from nanovllm.engine.sequence import Sequence

pytestmark = pytest.mark.gpu


def test_adjustments_on_the_gpu_match_the_cpu_without_a_sync():
    g = torch.Generator().manual_seed(1)
    vocab = 4096
    settings = [dict(), dict(frequency_penalty=1.0, presence_penalty=0.5), dict(repetition_penalty=1.4),
                dict(logit_bias={5: 10.0}, min_tokens=4)] * 8
    seqs = []
    for kw in settings:
        seq = Sequence(torch.randint(0, vocab, (64,), generator=g).tolist(), SamplingParams(max_tokens=32, **kw))
        seq.token_ids += torch.randint(0, vocab, (20,), generator=g).tolist()
        seq.min_tokens_stop_ids = frozenset({1, 2})
        seqs.append(seq)
    logits = torch.randn(len(seqs), vocab, generator=g)
    want = LogitsAdjustment.of(seqs, vocab, torch.device("cpu")).apply(logits)
    on_gpu = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = LogitsAdjustment.of(seqs, vocab, torch.device("cuda")).apply(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), want)


def test_grammar_masks_on_the_gpu_match_the_cpu_without_a_sync():
    """The masks of constrained rows reach the GPU without the host waiting for it (pinned, non-blocking)."""
    xgr = pytest.importorskip("xgrammar")
    from nanovllm.structured.masks import apply_grammar_masks

    vocab = 300
    info = xgr.TokenizerInfo([f"<{i}>" for i in range(vocab - 10)] + list("0123456789"), vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_regex("[0-9]+")
    matchers = [None, xgr.GrammarMatcher(compiled), None, xgr.GrammarMatcher(compiled)]
    logits = torch.randn(len(matchers), vocab, generator=torch.Generator().manual_seed(2))
    want = logits.clone()
    apply_grammar_masks(want, matchers)
    on_gpu = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_grammar_masks(on_gpu, matchers)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(on_gpu.cpu(), want)
    assert torch.isinf(want[1, : vocab - 10]).all() and not torch.isinf(want[0]).any()
