"""The `triton_quant` and `fp8_w8a8` kernels (kernels/triton/quant_*.py, fp8_w8a8.py) against the dense
reference of a QuantizedWeight (dequantize, then the op's native), on CPU through the Triton interpreter.

As in test_triton_kernels.py, the interpreter tests run in a fresh subprocess with TRITON_INTERPRET=1 set
before any plugin is imported. Sizes are odd and small (N=37, K=71; rows 1: the FMA path, 3: the tl.dot
path, 20: the many-rows fallback); every format, with and without offsets, group sizes 16 / 32 / 64 and one
group per row, and act-order permutations.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from nanovllm.ops import Target, get_op, load_plugins, native_site, resolve
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from nanovllm.quant.rtn import quantize
from nanovllm.quant.weights import FORMATS, QuantizedWeight
from tests.helpers import compile_for_hopper, marked_tests, run_under_the_interpreter

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in test_quant_kernels_under_the_interpreter's subprocess")
DTYPES = [torch.float32, torch.bfloat16]
# (format, group size (None: per channel), symmetric, act-order)
WEIGHTS = [("fp8", None, True, False), ("int8", None, True, False), ("int4", 32, True, False),
           ("int4", 16, False, True), ("fp8", 32, True, False), ("int4", None, False, False),
           ("int8", 64, True, True)]
WEIGHT_IDS = [f"{f}-{'ch' if g is None else f'g{g}'}{'' if s else '-z'}{'-perm' if p else ''}"
              for f, g, s, p in WEIGHTS]

INTERPRETER_RUNS = {
    "linear": ("test_linear", "test_int4_read_as_words"),
    "sites": ("test_norm_qkv", "test_attn_out", "test_lm_head_sample", "test_every_backend_resolves_for_each_format"),
    "mlp": ("test_mlp", "test_unsupported_group_falls_back_to_the_reference"),
    "layer": ("test_decode_layer",),
}


@pytest.mark.parametrize("run", INTERPRETER_RUNS)
def test_quant_kernels_under_the_interpreter(run):
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    run_under_the_interpreter(__file__, INTERPRETER_RUNS[run], durations=5)


def test_interpreter_runs_hold_every_inner_test_once():
    runs = [name for names in INTERPRETER_RUNS.values() for name in names]
    assert sorted(runs) == sorted(marked_tests(globals(), inner.mark))


# -- reference helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qcore():
    load_plugins()
    mod = sys.modules["nanovllm_plugins.triton._quant_core"]
    assert type(mod._qgemv_kernel).__name__ == "InterpretedFunction", "kernels were not built for the interpreter"
    return mod


def impl(op: str):
    return get_op(op).impls["triton_quant"].fn


def qweight(n, k, spec, dtype, seed=0) -> QuantizedWeight:
    """An RTN-quantized random (n, k) weight of `spec` (a WEIGHTS entry), with a random act-order permutation."""
    fmt, group, symmetric, act_order = spec
    g = torch.Generator().manual_seed(seed)
    w = quantize((torch.randn(n, k, generator=g) * 0.2).to(dtype), fmt, group, symmetric)
    if act_order:
        perm = torch.randperm(k, generator=g)
        w = QuantizedWeight(w.format, w.qweight, w.scale, w.group_size, k, w.offset, perm, dtype)
    return w


def dense_of(w: QuantizedWeight, dtype) -> torch.Tensor:
    """The dense weight the quantized one stands for, in the input's column order (act-order undone)."""
    d = w.dequantize(torch.float32)
    if w.perm is not None:
        d = torch.empty_like(d).index_copy_(1, w.perm, d)
    return d.to(dtype)


def assert_close(got, want, dtype, scale=1.0):
    """Within the dtype's rounding of the output's magnitude: the kernels multiply the decoded fp32 weight, the
    reference its rounding to the model dtype."""
    got, want = got.float(), want.float()
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * scale
    torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def paged_meta(kv_lens, block_size=4, num_blocks=60, seed=0):
    """Decode metadata: one query per request, at the last of its kv_lens positions, scattered pages."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-kl // block_size))] for kl in kv_lens]
    return build_metadata(tables, kv_lens, block_size).to_device("cpu")


def config(qcore, cfg):
    """(BLOCK_N, BLOCK_K, SPLIT_K) forced for every launch, or None for the interpreter default."""
    return qcore.tuning.forced(qcore.tuning.Config(*cfg)) if cfg else contextlib.nullcontext()


# -- linear and the sites -------------------------------------------------------------------------------------
@inner
@pytest.mark.parametrize("spec", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (16, 32, 2)), (1, (8, 128, 1)), (3, None), (3, (16, 32, 3)),
                                      (3, (16, 32, 3, 4, 1, True)), (20, None), (70, None), (600, None)])
def test_linear(qcore, spec, rows, cfg):
    """Rows 1: the FMA path over two tiles (the default), split-K 2, one tile; rows 3: tl.dot, split-K 3
    (uneven K ranges); 20 and 70: the GEMM (64 and 128 rows per program); 600: dequantize then matmul. Bias
    on odd rows, bf16 and fp32 alternating."""
    dtype = DTYPES[rows % 2 if cfg is None else 1 - rows % 2]
    torch.manual_seed(rows)
    w = qweight(37, 71, spec, dtype, seed=rows)
    x = torch.randn(rows, 71, dtype=dtype)
    b = torch.randn(37, dtype=dtype) if rows % 2 else None
    with config(qcore, cfg):
        got = impl("linear")(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, 37)
    bf = None if b is None else b.float()
    assert_close(got, w.linear(x.float(), bf), dtype)
    assert_close(got, get_op("linear").native(x.float(), dense_of(w, torch.float32), bf), dtype)


@inner
@pytest.mark.parametrize("spec", [s for s in WEIGHTS if s[0] == "int4"], ids=[i for i in WEIGHT_IDS if "int4" in i])
@pytest.mark.parametrize("k,cfg", [(80, None), (80, (16, 32, 2)), (96, (8, 128, 1)), (48, (4, 16, 1))])
def test_int4_read_as_words(qcore, spec, k, cfg):
    """One row of an int4 weight whose rows are a multiple of 8 columns reads 32-bit words of 8 nibbles: two
    tiles, split-K 2 (uneven), one tile, and 16-column tiles; the norm prologue on the same path."""
    torch.manual_seed(k)
    dtype = torch.float32
    w = qweight(37, k, spec, dtype, seed=k)
    assert qcore.words(qcore.qw_of("int4", w.qweight, w.scale, w.offset, w.perm, w.group_size, k), 1)
    x, nw = torch.randn(1, k, dtype=dtype), torch.randn(k, dtype=dtype) * 0.2 + 1
    with config(qcore, cfg):
        got = impl("linear")(x, w)
        normed = impl("norm_qkv")(x, nw, w, None, 1e-6)
    assert_close(got, w.linear(x), dtype)
    assert_close(normed, native_site("norm_qkv")(x, nw, dense_of(w, dtype), None, 1e-6), dtype, scale=2)


@inner
@pytest.mark.parametrize("spec", WEIGHTS[:4], ids=WEIGHT_IDS[:4])
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (8, 128, 1)), (3, None), (20, None)])
def test_norm_qkv(qcore, spec, rows, cfg):
    dtype = torch.float32 if rows == 3 else torch.bfloat16
    torch.manual_seed(rows)
    w = qweight(37, 71, spec, dtype, seed=rows)
    x, nw, b = torch.randn(rows, 71, dtype=dtype), torch.randn(71, dtype=dtype) * 0.2 + 1, torch.randn(37, dtype=dtype)
    with config(qcore, cfg):
        got = impl("norm_qkv")(x, nw, w, b, 1e-6)
    assert_close(got, native_site("norm_qkv")(x, nw, dense_of(w, dtype), b, 1e-6), dtype, scale=2)


@inner
@pytest.mark.parametrize("spec", WEIGHTS[2:6], ids=WEIGHT_IDS[2:6])
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (16, 32, 2)), (3, None), (20, None)])
def test_attn_out(qcore, spec, rows, cfg):
    dtype = torch.float32 if rows == 3 else torch.bfloat16
    torch.manual_seed(rows)
    w = qweight(37, 71, spec, dtype, seed=rows)
    o, r, nw = torch.randn(rows, 71, dtype=dtype), torch.randn(rows, 37, dtype=dtype), torch.randn(37, dtype=dtype)
    with config(qcore, cfg):
        normed, res = impl("attn_out")(o, w, r, nw, 1e-6)
    want_normed, want_res = native_site("attn_out")(o, dense_of(w, dtype), r, nw, 1e-6)
    assert_close(res, want_res, dtype, scale=2)
    assert_close(normed, want_normed, dtype, scale=3)


@inner
@pytest.mark.parametrize("spec", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (4, 64, 1)), (3, (16, 32, 1)), (20, None)])
def test_mlp(qcore, spec, rows, cfg):
    """The site reads gate/up rows interleaved (its layout, applied to the QuantizedWeight through map_rows);
    the native reads [gate; up]. Intermediate 29 (odd: ragged blocks), hidden 37."""
    dtype = torch.bfloat16 if rows == 1 else torch.float32
    torch.manual_seed(rows)
    gate_up, down = qweight(2 * 29, 37, spec, dtype, seed=rows), qweight(37, 29, spec, dtype, seed=rows + 1)
    h, residual = torch.randn(rows, 37, dtype=dtype), torch.randn(rows, 37, dtype=dtype)
    layout = get_op("mlp").impls["triton_quant"].layouts["gate_up_w"]
    with config(qcore, cfg):
        got = impl("mlp")(h, layout(gate_up), down, residual)
    want = native_site("mlp")(h, dense_of(gate_up, dtype), dense_of(down, dtype), residual)
    assert_close(got, want, dtype, scale=3)


@inner
@pytest.mark.parametrize("spec", WEIGHTS[:4], ids=WEIGHT_IDS[:4])
@pytest.mark.parametrize("rows", [1, 3])
def test_lm_head_sample(qcore, spec, rows):
    """Greedy steps take the fused argmax (ties within rounding allowed), a sampled step the fused logits."""
    torch.manual_seed(rows)
    vocab, dtype = 301, torch.float32
    h, nw = torch.randn(rows, 37, dtype=dtype), torch.randn(37, dtype=dtype) * 0.2 + 1
    lm_w = qweight(vocab, 37, spec, dtype, seed=rows)
    greedy = (torch.zeros(rows), torch.full((rows,), -1), torch.ones(rows), torch.zeros(rows), None)
    got = impl("lm_head_sample")(h, nw, 1e-6, lm_w, *greedy)
    want = native_site("lm_head_sample")(h, nw, 1e-6, dense_of(lm_w, dtype), *greedy)
    logits = get_op("linear").native(get_op("rms_norm").native(h, nw, 1e-6), dense_of(lm_w, dtype))
    gap = logits.max(-1).values - logits.gather(1, got[:, None])[:, 0]
    assert got.dtype == torch.int64 and ((got == want).all() or (gap <= 1e-4).all()), (got, want, gap)
    noise = torch.empty(rows, vocab).exponential_()
    sampled = (torch.rand(rows) + 0.5, torch.full((rows,), -1), torch.ones(rows), torch.zeros(rows), noise)
    got = impl("lm_head_sample")(h, nw, 1e-6, lm_w, *sampled)
    assert got.tolist() == native_site("lm_head_sample")(h, nw, 1e-6, dense_of(lm_w, dtype), *sampled).tolist()


@inner
@pytest.mark.parametrize("spec", [WEIGHTS[0], WEIGHTS[3], WEIGHTS[5]], ids=[WEIGHT_IDS[i] for i in (0, 3, 5)])
@pytest.mark.parametrize("kv_lens", [[70], [9, 30, 150]])
def test_decode_layer(qcore, spec, kv_lens):
    """The quantized five-launch chain against the native composition over the dense weights: the new residual
    stream and both caches. hidden 48, 4 query heads over 2 kv heads of 12 dims, intermediate 37."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(len(kv_lens))
    dtype, hidden, hq, hk, d, inter = torch.float32, 48, 4, 2, 12, 37
    meta = paged_meta(kv_lens)
    norm = lambda n: torch.randn(n, dtype=dtype) * 0.2 + 1  # noqa: E731
    q = [qweight(*shape, spec, dtype, seed=i) for i, shape in
         enumerate([((hq + 2 * hk) * d, hidden), (hidden, hq * d), (2 * inter, hidden), (hidden, inter)])]
    weights = LayerWeights(norm(hidden), q[0], None, norm(d), norm(d), q[1], norm(hidden), q[2], q[3])
    dense = weights._replace(**{f: dense_of(getattr(weights, f), dtype)
                                for f in ("qkv_w", "o_w", "gate_up_w", "down_w")})
    settings = AttentionSettings(1e-6, 0.3)
    rest = (meta.positions, cos_sin_table(Rope(), d, 256))
    kc, vc = torch.randn(60, 4, hk, d, dtype=dtype), torch.randn(60, 4, hk, d, dtype=dtype)
    caches = [kc.clone(), vc.clone(), kc, vc]
    layer = get_op("decode_layer").impls["triton_quant"]
    x = torch.randn(len(kv_lens), hidden, dtype=dtype)
    got = layer.fn(x, weights._replace(gate_up_w=layer.layouts["gate_up_w"](q[2])), settings, *rest, caches[0],
                   caches[1], meta)
    want = native_site("decode_layer")(x, dense, settings, *rest, caches[2], caches[3], meta)
    assert_close(got, want, dtype, scale=10)
    assert_close(caches[0], caches[2], dtype, scale=10)
    assert_close(caches[1], caches[3], dtype, scale=10)


@inner
def test_every_backend_resolves_for_each_format(qcore):
    """triton_quant serves every weight-reading site for every format (not dense); fp8_w8a8 is cuda-only."""
    for op in ("linear", "norm_qkv", "attn_out", "mlp", "decode_layer", "lm_head_sample"):
        parts = {p: get_op(p).native for p in get_op(op).parts}
        for fmt in FORMATS:
            _, used = resolve(op, "triton_quant", Target("cpu", torch.bfloat16, weight_format=fmt),
                              allow_fallback=False, parts=parts)
            assert used == "triton_quant"
        with pytest.raises(ValueError, match="dense weights"):
            resolve(op, "triton_quant", Target("cpu", torch.bfloat16), allow_fallback=False, parts=parts)
    with pytest.raises(ValueError):
        resolve("linear", "fp8_w8a8", Target("cpu", torch.bfloat16, weight_format="fp8"), allow_fallback=False)


@inner
def test_unsupported_group_falls_back_to_the_reference(qcore):
    """A group size that is neither a power of two nor the whole row runs the dense reference."""
    w = quantize(torch.randn(37, 71), "int4", 24)
    x = torch.randn(2, 71)
    assert qcore.supported(w) is not None
    torch.testing.assert_close(impl("linear")(x, w), w.linear(x))
    layout = get_op("mlp").impls["triton_quant"].layouts["gate_up_w"]
    gate_up, down = quantize(torch.randn(58, 37), "int4", 24), quantize(torch.randn(37, 29), "int4", 24)
    h = torch.randn(1, 37)
    torch.testing.assert_close(impl("mlp")(h, layout(gate_up), down, None),
                               native_site("mlp")(h, gate_up.dequantize(torch.float32), down.dequantize(torch.float32),
                                                  None), atol=1e-4, rtol=1e-4)


# -- fp8_w8a8: the activation quantization (the GEMM itself runs on the GPU: test_quant_kernels_gpu.py) --------
def test_fp8_activation_rows_quantize_to_their_own_scale():
    """quantize_rows: one scale per row, amax / 448; xq * sx reproduces x within e4m3's relative step; an
    all-zero row stays zero (no division by zero)."""
    from nanovllm.ops.plugins import load_builtin

    w8a8 = load_builtin("triton/fp8_w8a8")
    x = torch.randn(5, 67, dtype=torch.bfloat16) * torch.tensor([1.0, 100.0, 1e-3, 0.0, 7.0])[:, None].bfloat16()
    xq, sx = w8a8.quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and sx.shape == (5, 1) and sx.dtype == torch.float32
    amax = x.float().abs().amax(-1, keepdim=True)
    torch.testing.assert_close(sx, (amax / 448).clamp_min(1e-12))
    assert (xq.float().abs().amax(-1) <= 448).all()
    back = xq.float() * sx
    torch.testing.assert_close(back, x.float(), atol=0, rtol=2 ** -3)  # e4m3: 3 mantissa bits
    assert (back[3] == 0).all()
    w = quantize(torch.randn(32, 64), "fp8")
    assert w8a8.scaled_mm_reason(torch.randn(20, 64, dtype=torch.bfloat16), w) is None
    assert "group-wise" in w8a8.scaled_mm_reason(torch.randn(20, 64, dtype=torch.bfloat16),
                                                  quantize(torch.randn(32, 64), "fp8", 32))


# -- compiled for Hopper (no GPU needed: Triton's compiler and its bundled ptxas) -----------------------------
HOPPER_VARIANTS = {  # name: (FORMAT, HAS_OFFSET, HAS_PERM, SCALE_LAST, SUB, BLOCK_M, BLOCK_N, BLOCK_K, warps, extra)
    "int4 words, one row, norm": (3, False, False, False, 128, 1, 8, 2048, 4, dict(HAS_NORM=True)),
    "int8 per channel, one row, split-K": (1, False, True, True, 1024, 1, 8, 1024, 4, dict(SPLIT_K=2, PARTIAL=True)),
    "int4 bytes with offsets, GEMM": (2, True, False, False, 128, 128, 128, 128, 8, dict(HAS_BIAS=True)),
}


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
def test_kernels_compile_for_hopper(variant):
    """Each variant compiles to sm_90 machine code (compile_for_hopper)."""
    if INTERPRETED:
        pytest.skip("interpreted kernels do not compile")
    load_plugins()
    kernel = sys.modules["nanovllm_plugins.triton._quant_core"]._qgemv_kernel
    fmt, offset, perm, scale_last, sub, bm, bn, bk, warps, extra = HOPPER_VARIANTS[variant]
    const = {**dict(FORMAT=fmt, HAS_OFFSET=offset, HAS_PERM=perm, SCALE_LAST=scale_last, SUB=sub, HAS_BIAS=False,
                    HAS_RES=False, HAS_NORM=False, PARTIAL=False, SPLIT_K=1, ONE_TILE=False, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, DOT_F32=False, PDL=True, PREFETCH=True), **extra}
    pointers = dict(w_ptr={1: "*i8", 3: "*i32"}.get(fmt, "*u8"), s_ptr="*fp32", o_ptr="*fp32", perm_ptr="*i64",
                    y_ptr="*fp32" if const["PARTIAL"] else "*bf16")
    compiled = compile_for_hopper(kernel, const, pointers, warps)
    assert compiled.asm["cubin"]
