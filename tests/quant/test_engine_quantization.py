"""`quantization=` through every entry: EngineConfig's checks, LLM(..., device="cpu") greedy generation on the
tiny random-weight model, the Hydra presets and the CLI flags."""

from __future__ import annotations

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig

CPU_SMALL = dict(device="cpu", enforce_eager=True, max_model_len=256, num_kvcache_blocks=32)


@pytest.mark.parametrize("kwargs, error", [
    (dict(quantization="int3"), "quantization='int3' is not one of fp8, int8, int4"),
    (dict(quantization="int4", quantization_group_size=96), "quantization_group_size=96: int4 groups are one of"),
    (dict(quantization="fp8", quantization_symmetric=False), "a zero point.* is int4 only, not fp8"),
    (dict(quantization_skip="first"), "quantization_skip set without quantization"),
    (dict(quantization="int8", quantization_skip="1-x"), "quantization_skip='1-x': write layer indices"),
])
def test_config_errors(kwargs, error):
    with pytest.raises(ValueError, match=error):
        EngineConfig(device="cpu", **kwargs)


def test_none_means_dense():
    assert EngineConfig(device="cpu", quantization="none").quantization is None


def test_skip_beyond_the_model_fails_at_load():
    with pytest.raises(ValueError, match="quantization_skip='0-9': layers .* outside 0..1"):
        LLM("tiny", quantization="int8", quantization_skip="0-9", **CPU_SMALL)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_greedy_generation_on_cpu(fmt):
    with LLM("tiny", quantization=fmt, quantization_skip="last", **CPU_SMALL) as llm:
        out = llm.generate(["hello world", "a b c"], SamplingParams(temperature=0, max_tokens=6))
        assert [len(o["token_ids"]) for o in out] == [6, 6]
        info = llm.model_info
        assert info["quantization"].startswith(fmt) and info["quantized_formats"] == {fmt: 4}
        assert info["weight_bytes_quantized"] > 0 and info["weight_bytes_unquantized"] > info["weight_bytes_dense"]
        assert f"{fmt} weights in layers 0" in llm.kernel_summary


def test_hydra_presets_set_the_quantization():
    from nanovllm.ops.resolved import compose

    cfg = compose(["+kernels=[all_fused,int4]", "engine.quantization_group_size=64"])
    assert cfg.engine.quantization == "int4" and cfg.engine.quantization_group_size == 64
    assert cfg.kernels.ops.linear == "triton_quant" and cfg.kernels.ops.rms_norm == "triton"
    assert cfg.kernels.layers.model.lm_head_sample == "triton"
    assert compose(["+kernels=fp8", "engine.quantization=int8"]).engine.quantization == "int8"


def test_cli_flags():
    from nanovllm.cli import to_hydra

    argv = to_hydra("run", ["tiny", "--quantization", "int4", "--quantization-group-size", "64",
                            "--quantization-zero-point", "--quantization-skip", "first,last", "--quantize-lm-head"],
                    model_presets=("tiny",)).argv
    assert argv == ["model=tiny", "engine.quantization=int4", "engine.quantization_group_size=64",
                    "engine.quantization_symmetric=false", "engine.quantization_skip='first,last'",
                    "engine.quantization_lm_head=true"]
