"""The FP8 KV cache (kv_cache_dtype=fp8) in every op that writes or reads the paged cache, against the dense
(model-dtype) cache on fresh random inputs: K and V stored as round(x / scale) with one scale per KV head,
read back as fp8 * scale.

Two references per path: the same op on the dense cache holding the dequantized values (the fp8 path must
match it closely: only rounding order differs) and the op on the unquantized cache (fp8-level tolerance).
Triton kernels run through the interpreter in a subprocess, as in test_triton_kernels.py; GPU cases are
marked `gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nanovllm.ops import Target, get_op, kv_quant, load_plugins, native_site, resolve
from nanovllm.ops.registry import KV_DTYPES, RegistryError, declare_kv_dtypes
from nanovllm.ops.testing import random_step
from tests.helpers import ROOT

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in test_fp8_kernels_under_the_interpreter's subprocess")
# fp8 e4m3 keeps 3 mantissa bits: a value is off by at most 1/16 of itself; one ulp is 1/8
FP8_REL = 0.13
# attention outputs (values of order 1) over an fp8 cache vs the unquantized cache: the largest and the mean
# absolute difference (a sharp softmax over a few keys amplifies the keys' rounding)
VS_DENSE_MAX, VS_DENSE_MEAN = 0.35, 0.02
# the fp8 path vs the same op over the dequantized cache: rounding order only (a few stores one ulp apart)
VS_DEQUANT = {torch.float32: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def assert_close_to_dense(got: torch.Tensor, want: torch.Tensor):
    err = (got.float() - want.float()).abs()
    assert err.max() <= VS_DENSE_MAX and err.mean() <= VS_DENSE_MEAN, (err.max(), err.mean())


def per_head_scales(x: torch.Tensor) -> torch.Tensor:
    """(heads,) scales from the per-head amax of x (..., heads, dim), with uneven headroom per head."""
    amax = x.abs().float().amax(dim=tuple(i for i in range(x.dim()) if i != x.dim() - 2))
    return kv_quant.scales_from_amax(amax) * torch.linspace(0.6, 1.3, amax.numel(), device=x.device)


def fp8_caches(kc: torch.Tensor, vc: torch.Tensor):
    """(fp8 k cache, fp8 v cache, kv_scales (2, Hk), dequantized k cache, dequantized v cache)."""
    scales = torch.stack([per_head_scales(kc), per_head_scales(vc)])
    qk, qv = kv_quant.quantize(kc, scales[0]), kv_quant.quantize(vc, scales[1])
    deq = [kv_quant.dequantize(c, s, kc.dtype) for c, s in zip((qk, qv), scales)]
    return qk, qv, scales, *deq


# -- the number format ------------------------------------------------------------------------------------------
def test_quantize_round_trip_and_saturation():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 7) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    scale = per_head_scales(x)
    q = kv_quant.quantize(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    back = kv_quant.dequantize(q, scale, torch.float32)
    torch.testing.assert_close(back, x, atol=float(scale.max()) * 2 ** -9 * 4, rtol=FP8_REL / 2)
    big = kv_quant.quantize(torch.full((1, 3, 2), 1e6), torch.ones(3))  # clamped, never NaN
    assert torch.equal(big.float(), torch.full((1, 3, 2), kv_quant.FP8_MAX))


def test_scales_from_amax_headroom_and_silent_heads():
    s = kv_quant.scales_from_amax(torch.tensor([448.0, 0.0, 2.0]))
    torch.testing.assert_close(s, torch.tensor([kv_quant.CALIBRATION_HEADROOM, 1.0,
                                                2.0 * kv_quant.CALIBRATION_HEADROOM / 448]))


@pytest.mark.parametrize("name", ["auto", "fp8", "fp8_e4m3"])
def test_storage_dtype(name):
    want = torch.float8_e4m3fn if name != "auto" else torch.bfloat16
    assert kv_quant.storage_dtype(name, torch.bfloat16) == want


def test_unknown_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        kv_quant.normalize("int4")


# -- native and sdpa -----------------------------------------------------------------------------------------------
def test_store_kv_writes_quantized_rows():
    torch.manual_seed(1)
    k, v = torch.randn(5, 3, 9), torch.randn(5, 3, 9) * 4
    scales = torch.stack([per_head_scales(k), per_head_scales(v)])
    kc, vc = (torch.zeros(4, 4, 3, 9, dtype=torch.float8_e4m3fn) for _ in range(2))
    slots = torch.tensor([0, 7, 3, 12, 9])
    get_op("store_kv").native(k, v, kc, vc, slots, scales)
    for cache, x, s in ((kc, k, scales[0]), (vc, v, scales[1])):
        rows = cache.view(-1, 3, 9)[slots]
        assert torch.equal(rows.view(torch.uint8), kv_quant.quantize(x, s).view(torch.uint8))
        torch.testing.assert_close(kv_quant.dequantize(rows, s, torch.float32), x, atol=1e-3, rtol=FP8_REL / 2)


def run_attention(name: str, backend: str, q_lens, kv_lens, heads=(6, 2), head_dim=12, window=0, softcap=0.0,
                  dtype=torch.float32, seed=0):
    load_plugins()
    torch.manual_seed(seed)
    meta, num_blocks = random_step(q_lens, kv_lens, block_size=4, seed=seed)
    kc = torch.randn(num_blocks + 1, 4, heads[1], head_dim, dtype=dtype) * torch.tensor([1.0, 3.0, 0.2])[:heads[1],
                                                                                                           None]
    vc = torch.randn_like(kc)
    q = torch.randn(sum(q_lens), heads[0], head_dim, dtype=dtype)
    qk, qv, scales, dk, dv = fp8_caches(kc, vc)
    op = get_op(name)
    fn = op.native if backend == "eager" else op.impls[backend].fn
    got = fn(q, qk, qv, meta, 0.3, window, softcap, scales)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got, op.native(q, dk, dv, meta, 0.3, window, softcap), **VS_DEQUANT[dtype])
    assert_close_to_dense(got, op.native(q, kc, vc, meta, 0.3, window, softcap))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_lens,heads,window", [([1], (6, 2), 0), ([5, 17, 33], (4, 1), 0),
                                                  ([9, 2, 30], (3, 3), 5)])
def test_attention_decode_fp8(backend, kv_lens, heads, window):
    run_attention("attention_decode", backend, [1] * len(kv_lens), kv_lens, heads, window=window)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("q_lens,kv_lens", [([3], [3]), ([7, 1, 13], [7, 9, 30]), ([5, 2], [21, 2])])
def test_attention_prefill_fp8(backend, q_lens, kv_lens):
    run_attention("attention_prefill", backend, q_lens, kv_lens, head_dim=11)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_fp8_bf16_and_softcap(backend):
    run_attention("attention_prefill", backend, [4, 2], [9, 14], softcap=5.0, dtype=torch.bfloat16, seed=3)
    run_attention("attention_decode", backend, [1, 1], [9, 14], dtype=torch.bfloat16, seed=4)


def test_native_sites_pass_the_scales_on():
    """qk_norm_rope then attention_decode, natively, on an fp8 cache equal the dense sites with the new rows
    quantized: the sites forward kv_scales to store_kv and the attention."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(2)
    meta, num_blocks = random_step([1, 1], [6, 13], block_size=4, seed=2)
    hq, hk, d = 4, 2, 8
    q, k, v = torch.randn(2, hq, d), torch.randn(2, hk, d), torch.randn(2, hk, d)
    kc, vc = torch.randn(num_blocks + 1, 4, hk, d), torch.randn(num_blocks + 1, 4, hk, d)
    qk, qv, scales, dk, dv = fp8_caches(kc, vc)
    args = (q, k, v, None, None, 1e-6, meta.positions, cos_sin_table(Rope(), d, 64))
    got = native_site("rope_decode_attention")(*args, qk, qv, meta, 0.3, 0, 0.0, scales)
    want = native_site("rope_decode_attention")(*args, dk, dv, meta, 0.3, 0, 0.0)
    assert_close_to_dense(got, want)
    # the new rows in the fp8 cache are the dense cache's new rows, quantized
    slots = meta.slot_mapping
    assert torch.equal(qv.view(-1, hk, d)[slots].view(torch.uint8),
                       kv_quant.quantize(dv.view(-1, hk, d)[slots], scales[1]).view(torch.uint8))


# -- how backends declare the KV dtypes they handle ------------------------------------------------------------------
def test_cache_ops_default_to_the_model_dtype_cache():
    load_plugins()
    for op in ("store_kv", "attention_prefill", "attention_decode", "qk_norm_rope", "rope_decode_attention",
               "decode_layer"):
        assert get_op(op).reads_kv
        assert get_op(op).impls["eager"].support.kv_dtypes == KV_DTYPES
    assert not get_op("linear").reads_kv and not get_op("mlp").reads_kv
    assert get_op("attention_decode").impls["sdpa"].support.kv_dtypes == KV_DTYPES
    assert get_op("attention_decode").impls["compile"].support.kv_dtypes == ("auto",)


def test_unsupported_kv_dtype_falls_back_with_a_reason():
    load_plugins()
    messages = []
    fp8 = Target("cpu", torch.float32, kv_dtype="fp8")
    _, used = resolve("attention_decode", "compile", fp8, on_fallback=messages.append)
    assert used == "eager" and "fp8 KV cache not in ['auto']" in messages[0]
    _, used = resolve("attention_decode", "sdpa", fp8)
    assert used == "sdpa"
    _, used = resolve("linear", "compile", fp8)  # ops that never touch the cache ignore its dtype
    assert used == "compile"
    with pytest.raises(RegistryError, match="fp8 KV cache"):
        resolve("attention_prefill", "compile", fp8, allow_fallback=False)


def test_declare_kv_dtypes_checks_names():
    with pytest.raises(RegistryError, match="unknown KV cache dtype"):
        declare_kv_dtypes("attention_decode", "eager", ("int4",))
    with pytest.raises(RegistryError, match="no backend"):
        declare_kv_dtypes("attention_decode", "no_such_backend", ("fp8",))


def test_flashinfer_declares_the_model_dtype_cache_only():
    """FlashInfer's fp8 KV takes one scale per tensor, not per head: its attention backends fall back."""
    load_plugins()
    for op in ("attention_decode", "attention_prefill"):
        for name, impl in get_op(op).impls.items():
            if "flashinfer" in name or name == "cascade":
                assert impl.support.kv_dtypes == ("auto",), (op, name)


# -- Triton kernels through the interpreter ------------------------------------------------------------------------
def test_fp8_kernels_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "triton and not gpu"],
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def triton_fn(op: str, backend: str = "triton"):
    load_plugins()
    return get_op(op).impls[backend].fn


def assert_fp8_caches_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor):
    """fp8 caches equal up to stores one ulp apart (the kernel and torch may round a tie differently)."""
    g, w = (kv_quant.dequantize(c, scale, torch.float32) for c in (got, want))
    torch.testing.assert_close(g, w, atol=float(scale.max()) * 2 ** -9, rtol=FP8_REL)
    assert (got.view(torch.uint8) != want.view(torch.uint8)).float().mean() < 0.05


def rope_case(dtype, tokens, hq, hk, d, qk_norm, seed):
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, dtype=dtype)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split((hq * d, hk * d, hk * d), -1))
    norms = ((torch.randn(d) * 0.2 + 1).to(dtype), (torch.randn(d) * 0.2 + 1).to(dtype)) if qk_norm else (None, None)
    return q, k, v, norms, cos_sin_table(Rope(), d, 256)


@inner
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,head_dim,qk_norm", [(1, 12, True), (3, 16, False)])
def test_triton_qk_norm_rope_fp8(dtype, tokens, head_dim, qk_norm):
    hq, hk = 4, 2
    q, k, v, norms, table = rope_case(dtype, tokens, hq, hk, head_dim, qk_norm, seed=tokens)
    pos, slots = torch.randint(0, 50, (tokens,)), torch.randperm(8 * 4)[:tokens]
    scales = torch.stack([per_head_scales(k), per_head_scales(v)])
    caches = [torch.zeros(8, 4, hk, head_dim, dtype=torch.float8_e4m3fn) for _ in range(4)]
    got = triton_fn("qk_norm_rope")(q, k, v, *norms, 1e-6, pos, table, caches[0], caches[1], slots, scales)
    want = native_site("qk_norm_rope")(q, k, v, *norms, 1e-6, pos, table, caches[2], caches[3], slots, scales)
    torch.testing.assert_close(got, want, **VS_DEQUANT[dtype])
    assert_fp8_caches_close(caches[0], caches[2], scales[0])
    assert_fp8_caches_close(caches[1], caches[3], scales[1])


def decode_case(dtype, kv_lens, hk=2, d=12, seed=0):
    meta, num_blocks = random_step([1] * len(kv_lens), kv_lens, block_size=4, seed=seed)
    torch.manual_seed(seed)
    kc = torch.randn(num_blocks + 1, 4, hk, d, dtype=dtype) * torch.tensor([1.0, 3.0])[:hk, None]
    vc = torch.randn_like(kc)
    return meta, kc, vc


@inner
@pytest.mark.parametrize("dtype,window,softcap,splits", [
    (torch.float32, 0, 0.0, 0), (torch.float32, 6, 0.0, 3), (torch.float32, 0, 5.0, 2), (torch.bfloat16, 0, 0.0, 0),
    (torch.bfloat16, 0, 0.0, 2)])
def test_triton_attention_decode_fp8(dtype, window, softcap, splits):
    meta, kc, vc = decode_case(dtype, [1, 17, 70], seed=splits)
    qk, qv, scales, dk, dv = fp8_caches(kc, vc)
    q = torch.randn(3, 6, 12, dtype=dtype)  # GQA groups of 3, head_dim 12 (padded to 16 inside)
    if splits:
        got = torch.ops.nanovllm_triton.decode_attention(q, qk, qv, meta.block_tables, meta.positions, 0.3, window,
                                                         softcap, splits, scales)
    else:
        got = triton_fn("attention_decode")(q, qk, qv, meta, 0.3, window, softcap, scales)
    native = get_op("attention_decode").native
    torch.testing.assert_close(got, native(q, qk, qv, meta, 0.3, window, softcap, scales), **VS_DEQUANT[dtype])
    assert_close_to_dense(got, native(q, kc, vc, meta, 0.3, window, softcap))


@inner
@pytest.mark.parametrize("dtype,qk_norm,splits", [(torch.float32, True, 0), (torch.float32, False, 3),
                                                  (torch.bfloat16, True, 2)])
def test_triton_rope_decode_attention_fp8(dtype, qk_norm, splits):
    """The fused kernel writes the new key and value quantized and reads the cache through the scales."""
    meta, kc, vc = decode_case(dtype, [1, 17, 70], seed=10 + splits)
    q, k, v, norms, table = rope_case(dtype, 3, 6, 2, 12, qk_norm, seed=splits)
    qk, qv, scales, _, _ = fp8_caches(kc, vc)
    caches = [qk.clone(), qv.clone(), qk, qv]
    args = (q, k, v, *norms, 1e-6, meta.positions, table)
    if splits:
        got = torch.ops.nanovllm_triton.rope_decode_attention(*args, caches[0], caches[1], meta.slot_mapping,
                                                              meta.block_tables, 0.3, 0, 0.0, splits, scales)
    else:
        got = triton_fn("rope_decode_attention")(*args, caches[0], caches[1], meta, 0.3, 0, 0.0, scales)
    want = native_site("rope_decode_attention")(*args, caches[2], caches[3], meta, 0.3, 0, 0.0, scales)
    torch.testing.assert_close(got, want, **VS_DEQUANT[dtype])
    assert_fp8_caches_close(caches[0], caches[2], scales[0])
    assert_fp8_caches_close(caches[1], caches[3], scales[1])


@inner
@pytest.mark.parametrize("dtype,kv_lens", [(torch.float32, [70]), (torch.float32, [150, 5]), (torch.bfloat16, [33])])
def test_triton_decode_chain_fp8(dtype, kv_lens):
    """The decode chain (backend triton_chain of decode_layer) passes the scales to its attention launch."""
    from nanovllm.ops.sites import AttentionSettings, LayerWeights

    hidden, hq, hk, d, inter = 48, 4, 2, 12, 37
    meta, kc, vc = decode_case(dtype, kv_lens, hk, d, seed=len(kv_lens))
    _, _, _, norms, table = rope_case(dtype, 1, hq, hk, d, True, seed=1)

    def w(*shape):
        return (torch.randn(*shape) * 0.2).to(dtype)

    weights = LayerWeights(w(hidden) + 1, w((hq + 2 * hk) * d, hidden), None, *norms, w(hidden, hq * d), w(hidden) + 1,
                           w(2 * inter, hidden), w(hidden, inter))
    x = torch.randn(len(kv_lens), hidden, dtype=dtype)
    qk, qv, scales, _, _ = fp8_caches(kc, vc)
    caches = [qk.clone(), qv.clone(), qk, qv]
    load_plugins()
    chain = get_op("decode_layer").impls["triton_chain"]
    laid_out = weights._replace(gate_up_w=chain.layouts["gate_up_w"](weights.gate_up_w))
    settings = AttentionSettings(1e-6, 0.3)
    got = chain.fn(x, laid_out, settings, meta.positions, table, caches[0], caches[1], meta, scales)
    want = native_site("decode_layer")(x, weights, settings, meta.positions, table, caches[2], caches[3], meta, scales)
    # bf16: the interpreter rounds float32 to bfloat16 toward zero (the GPU to nearest), and a layer compounds it
    tol = VS_DEQUANT[dtype] if dtype == torch.float32 else dict(atol=0.3, rtol=0.06)
    torch.testing.assert_close(got, want, **tol)
    assert_fp8_caches_close(caches[0], caches[2], scales[0])
    assert_fp8_caches_close(caches[1], caches[3], scales[1])


@inner
def test_triton_all_fused_tiny_model_fp8_matches_eager_fp8(make_checkpoint):
    """A whole model with every Triton backend on an fp8 cache (the same calibrated scales: the calibration
    prefill is deterministic) against the eager model on an fp8 cache: logits agree to the few stores that
    round one fp8 step apart; every cache op resolved to Triton, none fell back."""
    import yaml

    from nanovllm import LLM
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    kernels = yaml.safe_load((ROOT / "configs/kernels/all_fused.yaml").read_text())
    path = make_checkpoint(seed=3, vocab_size=512)
    common = dict(device="cpu", dtype="float32", max_model_len=64, num_kvcache_blocks=16, kvcache_block_size=4,
                  max_num_seqs=2, kv_cache_dtype="fp8")
    prompt, forced = [5, 77, 301, 12, 9] + list(range(100, 115)), [44, 410, 7]
    with LLM(str(path), **common) as ref, LLM(str(path), kernels=kernels, **common) as fused:
        table = fused.engine.runner.resolver.table
        for op in ("qk_norm_rope", "attention_decode", "rope_decode_attention"):
            assert table["0"][op] == "triton", (op, table["0"][op])
        assert table["0"]["decode_layer"] == "triton_chain"
        for a, b in zip(ref.engine.runner.kv_scales, fused.engine.runner.kv_scales):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=0)
        want = teacher_forced_logits(ref.engine, prompt, forced)
        got = teacher_forced_logits(fused.engine, prompt, forced)
        torch.testing.assert_close(got, want, atol=2e-2 * want.std().item(), rtol=0)


# -- GPU: model shapes -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("batch,context", [(1, 128), (1, 4000), (16, 1000)])
def test_gpu_triton_decode_fp8_model_shapes(batch, context):
    """Qwen3-8B's attention shape (32 query heads over 8 KV heads of 128 dims), bf16, fp8 cache: the Triton
    decode attention and the fused rope_decode_attention against the native fp8 path."""
    load_plugins()
    dev, dtype = "cuda", torch.bfloat16
    meta, num_blocks = random_step([1] * batch, [context - i for i in range(batch)], block_size=16, seed=batch,
                                   device=dev)
    torch.manual_seed(batch)
    kc = torch.randn(num_blocks + 1, 16, 8, 128, dtype=dtype, device=dev)
    vc = torch.randn_like(kc)
    qk, qv, scales, _, _ = fp8_caches(kc, vc)
    q = torch.randn(batch, 32, 128, dtype=dtype, device=dev)
    got = get_op("attention_decode").impls["triton"].fn(q, qk, qv, meta, 128 ** -0.5, 0, 0.0, scales)
    want = get_op("attention_decode").native(q, qk, qv, meta, 128 ** -0.5, 0, 0.0, scales)
    torch.testing.assert_close(got, want, **VS_DEQUANT[dtype])
    assert_close_to_dense(got, get_op("attention_decode").native(q, kc, vc, meta, 128 ** -0.5, 0, 0.0))
    k, v = torch.randn(batch, 8, 128, dtype=dtype, device=dev), torch.randn(batch, 8, 128, dtype=dtype, device=dev)
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 1000000.0

    table = cos_sin_table(Rope(), 128, 8192).to(dev)
    norms = (torch.rand(128, device=dev, dtype=dtype) + 0.5, torch.rand(128, device=dev, dtype=dtype) + 0.5)
    caches = [qk.clone(), qv.clone(), qk, qv]
    args = (q, k, v, *norms, 1e-6, meta.positions, table)
    got = get_op("rope_decode_attention").impls["triton"].fn(*args, caches[0], caches[1], meta, 128 ** -0.5, 0, 0.0,
                                                            scales)
    want = native_site("rope_decode_attention")(*args, caches[2], caches[3], meta, 128 ** -0.5, 0, 0.0, scales)
    torch.testing.assert_close(got, want, **VS_DEQUANT[dtype])
    assert_fp8_caches_close(caches[0].cpu(), caches[2].cpu(), scales[0].cpu())
    assert_fp8_caches_close(caches[1].cpu(), caches[3].cpu(), scales[1].cpu())
