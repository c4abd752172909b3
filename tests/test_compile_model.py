"""Whole-model torch.compile (fullgraph) with the registry's ops inside: no graph breaks, same logits."""

from __future__ import annotations

import torch

from nanovllm import LLM
from nanovllm.engine.teacher_forcing import teacher_forced_logits


def test_forward_has_no_graph_breaks(tiny_model):
    llm = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16, kernels={"default": "eager"})
    engine = llm.engine
    engine.add_request([1, 2, 3, 4, 5], None)
    batch = engine.scheduler.schedule()
    input_ids, positions, meta, _ = engine.runner.prepare(batch)
    explanation = torch._dynamo.explain(engine.runner.model)(input_ids, positions, meta)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    engine.abort_request(batch[0].seq.request_id)


def test_compiled_model_matches_eager(tiny_model):
    eager = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16)
    compiled = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16, compile_model=True)
    prompt, forced = list(range(100, 120)), [5, 6, 7, 8]
    torch.testing.assert_close(teacher_forced_logits(compiled.engine, prompt, forced),
                               teacher_forced_logits(eager.engine, prompt, forced), atol=1e-4, rtol=1e-4)


def test_kv_caches_share_no_storage(tiny_model):
    """torch.compile writes K/V into the cache in place only when no other input aliases it: with K and V
    as views of one tensor, the `compile` backend copied a whole cache per layer and step (10 tok/s)."""
    llm = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16)
    caches = [t for layer in llm.engine.runner.model.layers for t in (layer.k_cache, layer.v_cache)]
    assert len({t.untyped_storage().data_ptr() for t in caches}) == len(caches)
