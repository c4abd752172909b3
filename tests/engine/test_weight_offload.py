"""Weight offloading on the CPU: the planner's choices, the fit check's message, bad values, and the streaming
mechanics (host buffer -> two staging slots around each layer, device == host) giving the resident run's greedy
output exactly."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.weight_offload import GIB, check_weights_fit, plan_offload, suggest_offload_gib

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, num_kvcache_blocks=32, max_num_seqs=4)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def layers(n: int, sizes=None) -> list[dict[str, int]]:
    sizes = sizes or {"qkv_proj": 30, "o_proj": 20, "gate_up_proj": 60, "down_proj": 40}
    return [dict(sizes) for _ in range(n)]


def test_plan_spreads_whole_layers_over_the_depth():
    assert plan_offload(layers(8), 0) == {}
    plan = plan_offload(layers(8), 2 * 150)
    assert sorted(plan) == [2, 6]  # two whole layers, evenly spaced and centred
    assert all(set(names) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} for names in plan.values())
    assert sorted(plan_offload(layers(8), 4 * 150)) == [1, 3, 5, 7]
    assert sorted(plan_offload(layers(8), 8 * 150)) == list(range(8))


def test_plan_takes_a_partial_layer_largest_tensors_first():
    plan = plan_offload(layers(6), 150 + 70)  # one whole layer, and 70 bytes of another
    assert len(plan) == 2
    whole, partial = sorted(plan.values(), key=len, reverse=True)
    assert len(whole) == 4 and partial == ("gate_up_proj", "down_proj")  # 60 + 40 reach 70
    assert plan_offload(layers(6), 10) in ({0: ("gate_up_proj",)}, {3: ("gate_up_proj",)})


def test_plan_skips_layers_without_offloadable_weights():
    sizes = layers(4)
    sizes[1] = sizes[2] = {}  # e.g. quantized layers (kept resident)
    assert sorted(plan_offload(sizes, 300)) == [0, 3]


def test_plan_rejects_a_budget_above_the_layers():
    with pytest.raises(ValueError, match=r"exceeds the offloadable weights .*set cpu_offload_gb <="):
        plan_offload(layers(2), 301)


def test_fit_check_says_how_much_to_offload():
    card = 80 * GIB
    check_weights_fit(10 * GIB, 10 * GIB, GIB // 2, 9 * GIB, 0.5, card, card)  # fits
    weights, layer = 28 * GIB, GIB // 2
    with pytest.raises(MemoryError) as err:  # a 16 GiB cap with 1 GiB already in use
        check_weights_fit(weights, weights, layer, 25 * GIB, 0.2, card - GIB, card)
    msg = str(err.value)
    assert "the weights need 28.00 GiB but gpu_memory_utilization=0.2 of the card's 80.0 GiB leaves 15.00 GiB" in msg
    assert "set cpu_offload_gb >= 14.0 (and keep room for the KV cache)" in msg
    assert suggest_offload_gib(weights, layer, 15 * GIB) == 14.0  # 28 + 2 staging slots of 0.5 - 15
    with pytest.raises(MemoryError, match="offloading every layer .* would not make room"):
        check_weights_fit(weights, weights, layer, 10 * GIB, 0.2, card - GIB, card)  # big embeddings, say


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="cpu_offload_gb must be >= 0"):
        EngineConfig(model="tiny", device="cpu", cpu_offload_gb=-1)
    with pytest.raises(ValueError, match="does not work with compile_model"):
        EngineConfig(model="tiny", device="cpu", cpu_offload_gb=1, compile_model=True)


def layer_bytes(model_dir) -> int:
    from nanovllm.models.loader import load_hf_config

    c = load_hf_config(model_dir)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return 4 * c.hidden_size * (q + 2 * kv + q + 3 * c.intermediate_size)  # float32 qkv, o, gate_up, down


def generate(model_dir, **engine) -> tuple[list[list[int]], object]:
    with LLM(str(model_dir), **ENGINE, **engine) as llm:
        runner = llm.engine.runner
        return [r["token_ids"] for r in llm.generate(PROMPTS, GREEDY)], runner.offloader


def test_offloaded_greedy_output_is_the_resident_one(make_checkpoint):
    """4.5 of 6 layers: four whole layers and part of a fifth, so the two slots serve offloaded layers 2 to 4 again."""
    model_dir = make_checkpoint(num_hidden_layers=6)
    resident, none = generate(model_dir)
    assert none is None
    gib = 4.5 * layer_bytes(model_dir) / GIB
    offloaded, offloader = generate(model_dir, cpu_offload_gb=gib)
    assert offloaded == resident
    assert len(offloader.spans) == 5 and sum(map(len, offloader.params)) == 4 * 4 + 2  # the partial: 2 largest
    assert offloader.offloaded_bytes >= gib * GIB
    for k, params in enumerate(offloader.params):  # every offloaded weight reads its staging slot
        slot = offloader.slots[k % 2]
        assert all(slot.data_ptr() <= p.data_ptr() < slot.data_ptr() + slot.numel() for p, _, _ in params)


def test_budget_above_the_model_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds the offloadable weights"):
        LLM(str(tiny_model), **ENGINE, cpu_offload_gb=1.0)


def test_fit_check_runs_before_the_weights_are_allocated(tiny_model, monkeypatch):
    """On CUDA the check reads the card's memory; here a fake card whose cap holds no weights."""
    import nanovllm.engine.weight_offload as wo

    seen = {}

    def fake_check(needed, *args):
        seen["needed"] = needed
        raise MemoryError("fake card")

    monkeypatch.setattr(wo, "check_weights_fit", fake_check)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GIB, GIB))
    from nanovllm.config import KernelConfig
    from nanovllm.models.dense import deferred_weights
    from nanovllm.models.loader import load_hf_config
    from nanovllm.models.registry import build_model, model_target
    from nanovllm.ops import OpResolver

    hf = load_hf_config(tiny_model)
    resolver = OpResolver(vars(KernelConfig()), model_target(hf, "cpu", torch.float32), hf.num_hidden_layers, {})
    with deferred_weights():
        model = build_model(hf, resolver)
    config = EngineConfig(model=str(tiny_model), device="cpu")
    with pytest.raises(MemoryError, match="fake card"):
        wo.place_weights(model, config, torch.device("cuda"), torch.float32)
    assert seen["needed"] == wo.weight_bytes(model, torch.float32)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_flag_reaches_the_engine_config():
    from nanovllm.cli import to_hydra

    assert to_hydra("serve", ["tiny", "--cpu-offload-gb", "8"], ("tiny",), ()).argv == \
        ["model=tiny", "engine.cpu_offload_gb=8"]
    assert EngineConfig(model="tiny", device="cpu", cpu_offload_gb=8).cpu_offload_gb == 8
