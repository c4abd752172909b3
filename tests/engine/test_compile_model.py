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
    as views of one tensor, the `compile` backend would copy a whole cache per layer and step."""
    llm = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16)
    caches = [t for layer in llm.engine.runner.model.layers for t in (layer.k_cache, layer.v_cache)]
    assert len({t.untyped_storage().data_ptr() for t in caches}) == len(caches)


def test_compiled_kv_write_is_in_place():
    """The `compile` backend's qk_norm_rope calls the K/V write on the caches themselves: Inductor on CUDA
    lowers a traced index_copy_/index_put_ into a pass over the whole cache per layer.
    The generated code must call the custom op directly on its cache inputs, no clone or cache-sized buffer."""
    from torch._inductor.utils import run_and_get_code

    from nanovllm.ops import get_op

    n, hq, hk, d, blocks = 3, 4, 2, 16, 37
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hk, hk))
    k_cache, v_cache = torch.zeros(blocks, 16, hk, d), torch.zeros(blocks, 16, hk, d)
    slots = torch.tensor([5, 70, 300])
    parts = {name: get_op(name).native for name in ("rms_norm", "rope", "store_kv")}
    args = (q, k, v, torch.ones(d), torch.ones(d), 1e-6, torch.tensor([1, 2, 3]), torch.randn(64, d),
            k_cache, v_cache, slots)
    compiled = torch.compile(get_op("qk_norm_rope").native, dynamic=True)
    with torch.inference_mode():
        _, code = run_and_get_code(compiled, *args, **parts)
    call = "\n".join(code).split("def call(")[1].split("def get_args")[0]  # the generated step, not its harness
    lines = [line.strip() for line in call.splitlines() if not line.strip().startswith("#")]
    assert any(line.startswith("torch.ops.nanovllm.store_kv.default(") for line in lines), call
    assert not [line for line in lines if "clone" in line or ("empty_strided" in line and f"({blocks}," in line)]
    assert torch.equal(v_cache.view(-1, hk, d)[slots], v)
