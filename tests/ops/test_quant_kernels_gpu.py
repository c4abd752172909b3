"""The `triton_quant` and `fp8_w8a8` kernels on the GPU at Qwen3-8B's and Qwen3-0.6B's shapes (bf16 activations),
each against the dense reference of its QuantizedWeight (dequantize, then the op's native), plus a CUDA graph
of the quantized decode chain and torch.compile(fullgraph=True) over the quantized GEMV.
Run: pytest -m gpu tests/ops/test_quant_kernels_gpu.py
The correctness tests run the untuned heuristic configs (NANOVLLM_TRITON_TUNE=0) to keep tuning time down;
benchmarks/quant_gemv.py tunes and times them.
"""

from __future__ import annotations

import sys

import pytest
import torch

from nanovllm.ops import get_op, load_plugins, native_site
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from nanovllm.quant.rtn import quantize
from nanovllm.quant.weights import QuantizedWeight

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
EPS = 1e-6
# Qwen3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 12288; Qwen3-0.6B: 1024, 16 / 8, 3072
SHAPES = {"8b_qkv": (6144, 4096), "8b_o": (4096, 4096), "8b_gate_up": (24576, 4096), "8b_down": (4096, 12288),
          "06b_qkv": (4096, 1024), "06b_o": (1024, 2048), "06b_gate_up": (6144, 1024), "06b_down": (1024, 3072)}
# (format, group size (None: per channel), symmetric, act-order)
SPECS = {"fp8": ("fp8", None, True, False), "fp8_block": ("fp8", 128, True, False),
         "int8": ("int8", None, True, False), "int4": ("int4", 128, True, False),
         "int4_zero": ("int4", 128, False, False), "int4_g32": ("int4", 32, True, False),
         "int4_act_order": ("int4", 128, True, True)}


@pytest.fixture(scope="module")
def qcore():
    load_plugins()
    return sys.modules["nanovllm_plugins.triton._quant_core"]


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    monkeypatch.setenv("NANOVLLM_TRITON_TUNE", "0")


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda").mul_(scale).bfloat16()


def qweight(n, k, spec: str) -> QuantizedWeight:
    fmt, group, symmetric, act_order = SPECS[spec]
    w = quantize(randn(n, k, scale=0.02), fmt, group, symmetric)
    if act_order:
        perm = torch.randperm(k, device="cuda")
        w = QuantizedWeight(w.format, w.qweight, w.scale, w.group_size, k, w.offset, perm, w.dtype)
    torch.cuda.synchronize()
    return w


def dense_of(w: QuantizedWeight) -> torch.Tensor:
    """The dense bf16 weight the quantized one stands for, in the input's column order."""
    d = w.dequantize(torch.float32)
    if w.perm is not None:
        d = torch.empty_like(d).index_copy_(1, w.perm, d)
    return d.bfloat16()


def impl(op: str, backend: str = "triton_quant"):
    return get_op(op).impls[backend].fn


def check(name, got, want, rel=2e-2):
    """Within bf16 rounding of the output's magnitude (the reference rounds the dequantized weight to bf16)."""
    got, want = got.float(), want.float()
    err = (got - want).abs()
    scale = want.abs().max().item()
    print(f"{name}: max abs err {err.max().item():.3g}, mean {err.mean().item():.3g}, max |want| {scale:.3g}")
    torch.testing.assert_close(got, want, atol=rel * max(scale, 1e-3), rtol=rel)


# -- linear ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 4, 16, 40, 300, 1000])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(qcore, shape, spec, rows):
    """Rows 1: the FMA path (int4 as words); 4, 16: tl.dot; 40, 300: the GEMM; 1000: dequantize, then cuBLAS."""
    torch.manual_seed(0)
    n, k = SHAPES[shape]
    w, x = qweight(n, k, spec), randn(rows, k)
    bias = randn(n, scale=0.1) if shape.endswith("qkv") else None
    got = impl("linear")(x, w, bias)
    check(f"linear {shape} {spec} rows={rows}", got, torch.nn.functional.linear(x, dense_of(w), bias))


@pytest.mark.parametrize("cfg", [(8, 1024, 2, 4, 1), (4, 2048, 4, 4, 1), (32, 128, 4, 4, 3), (32, 256, 1, 4, 3)])
@pytest.mark.parametrize("spec", ["fp8", "int8", "int4", "int4_zero"])
def test_linear_configs(qcore, spec, cfg):
    """Split-K with the reduce kernel and one-tile programs, on both paths (one row: FMA; 8 rows: tl.dot), with
    a residual."""
    torch.manual_seed(1)
    rows = 1 if cfg[0] < 16 else 8
    n, k = SHAPES["06b_down"]
    w, x, res = qweight(n, k, spec), randn(rows, k), randn(rows, n)
    with qcore.tuning.forced(qcore.tuning.Config(*cfg)):
        got = torch.ops.nanovllm_triton.qgemv(x, *qcore.weight_args(w), None, res, None, 0.0)
    check(f"qgemv {spec} {cfg}", got, res + torch.nn.functional.linear(x, dense_of(w)))


@pytest.mark.parametrize("spec", ["int4", "fp8"])
def test_linear_tunes_and_runs_in_a_cuda_graph(qcore, spec, monkeypatch):
    """One row, tuned (as the engine's first eager step does), then captured and replayed with new inputs."""
    monkeypatch.setenv("NANOVLLM_TRITON_TUNE", "1")
    monkeypatch.setenv("NANOVLLM_TRITON_TUNE_BUDGET_S", "10")
    torch.manual_seed(2)
    n, k = SHAPES["06b_gate_up"]
    w, x = qweight(n, k, spec), randn(1, k)
    lin = impl("linear")
    lin(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lin(x, w)
    x.copy_(randn(1, k))
    graph.replay()
    check(f"graph {spec}", y, torch.nn.functional.linear(x, dense_of(w)))


def test_qgemv_under_torch_compile(qcore):
    """The quantized GEMV is a torch custom op (triton_op): a fullgraph compile traces it."""
    torch.manual_seed(3)
    n, k = SHAPES["06b_qkv"]
    w, x = qweight(n, k, "int4"), randn(2, k)
    fn = torch.compile(lambda x: impl("linear")(x, w) * 2, fullgraph=True)
    check("compiled", fn(x), 2 * torch.nn.functional.linear(x, dense_of(w)))


# -- fused sites at Qwen3-0.6B's shapes -----------------------------------------------------------------------
H, HQ, HK, D, INTER, VOCAB = 1024, 16, 8, 128, 3072, 151936


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("spec", ["fp8", "int8", "int4", "int4_zero"])
def test_norm_qkv_attn_out_mlp(qcore, spec, rows):
    torch.manual_seed(4)
    x, r, o, nw = randn(rows, H), randn(rows, H), randn(rows, HQ * D), randn(H, scale=0.1).add_(1)
    qkv_w, o_w = qweight((HQ + 2 * HK) * D, H, spec), qweight(H, HQ * D, spec)
    gate_up, down = qweight(2 * INTER, H, spec), qweight(H, INTER, spec)
    check(f"norm_qkv {spec} rows={rows}", impl("norm_qkv")(x, nw, qkv_w, None, EPS),
          native_site("norm_qkv")(x, nw, dense_of(qkv_w), None, EPS))
    (normed, res), (want_normed, want_res) = (impl("attn_out")(o, o_w, r, nw, EPS),
                                              native_site("attn_out")(o, dense_of(o_w), r, nw, EPS))
    check(f"attn_out residual {spec} rows={rows}", res, want_res)
    check(f"attn_out normed {spec} rows={rows}", normed, want_normed, rel=4e-2)
    layout = get_op("mlp").impls["triton_quant"].layouts["gate_up_w"]
    check(f"mlp {spec} rows={rows}", impl("mlp")(x, layout(gate_up), down, r),
          native_site("mlp")(x, dense_of(gate_up), dense_of(down), r), rel=4e-2)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("spec", ["fp8", "int4"])
def test_lm_head_sample(qcore, spec, rows):
    """Greedy: the fused argmax picks the reference's token, or one whose logit is within rounding of the max."""
    torch.manual_seed(5)
    h, nw, lm_w = randn(rows, H), randn(H, scale=0.1).add_(1), qweight(VOCAB, H, spec)
    greedy = (torch.zeros(rows, device="cuda"), None, None, None, None)
    got = impl("lm_head_sample")(h, nw, EPS, lm_w, *greedy)
    logits = torch.nn.functional.linear(get_op("rms_norm").native(h, nw, EPS), dense_of(lm_w)).float()
    gap = logits.max(-1).values - logits.gather(1, got[:, None])[:, 0]
    assert got.dtype == torch.int64 and (gap <= 0.05 * logits.abs().max()).all(), gap


def paged_meta(kv_len: int, page: int = 16):
    blocks = -(-kv_len // page)
    return build_metadata([range(blocks)], [kv_len], page).to_device("cuda"), blocks


@pytest.mark.parametrize("kv_len", [1, 129, 4100])
@pytest.mark.parametrize("spec", ["fp8", "int4"])
def test_decode_layer_chain(qcore, spec, kv_len):
    """The quantized five-launch chain against the native layer over the dense weights, then replayed in a
    CUDA graph (the same step again rewrites the same K/V slot with the same values)."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 1e6

    torch.manual_seed(kv_len)
    meta, blocks = paged_meta(kv_len)
    norm = lambda n: randn(n, scale=0.1).add_(1)  # noqa: E731
    q = [qweight((HQ + 2 * HK) * D, H, spec), qweight(H, HQ * D, spec), qweight(2 * INTER, H, spec),
         qweight(H, INTER, spec)]
    weights = LayerWeights(norm(H), q[0], None, norm(D), norm(D), q[1], norm(H), q[2], q[3])
    dense = weights._replace(qkv_w=dense_of(q[0]), o_w=dense_of(q[1]), gate_up_w=dense_of(q[2]), down_w=dense_of(q[3]))
    layer = get_op("decode_layer").impls["triton_quant"]
    laid_out = weights._replace(gate_up_w=layer.layouts["gate_up_w"](q[2]))
    settings, rest = AttentionSettings(EPS, D ** -0.5), (meta.positions, cos_sin_table(Rope(), D, 8192).cuda())
    x, kc, vc = randn(1, H), randn(blocks, 16, HK, D), randn(blocks, 16, HK, D)
    kc_want, vc_want = kc.clone(), vc.clone()
    got = layer.fn(x, laid_out, settings, *rest, kc, vc, meta)
    want = native_site("decode_layer")(x, dense, settings, *rest, kc_want, vc_want, meta)
    check(f"decode_layer {spec} kv_len={kv_len}", got, want, rel=5e-2)
    check("k cache", kc, kc_want)
    check("v cache", vc, vc_want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = layer.fn(x, laid_out, settings, *rest, kc, vc, meta)
    for _ in range(3):
        graph.replay()
        assert torch.equal(replayed, got)


# -- fp8_w8a8 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
@pytest.mark.parametrize("shape", ["8b_qkv", "8b_down", "06b_gate_up"])
def test_fp8_w8a8(qcore, shape, rows):
    """Beyond 16 rows the W8A8 GEMM (activations rounded to e4m3 per token: a relative error of a few percent
    of the output's magnitude); up to 16 the weight-only GEMV. Bias added after the GEMM."""
    torch.manual_seed(6)
    n, k = SHAPES[shape]
    w, x, bias = qweight(n, k, "fp8"), randn(rows, k), randn(n, scale=0.1)
    got = impl("linear", "fp8_w8a8")(x, w, bias)
    want = torch.nn.functional.linear(x, dense_of(w), bias)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    print(f"fp8_w8a8 {shape} rows={rows}: relative error {rel:.3g}")
    assert rel < (0.01 if rows <= 16 else 0.08)
    block = qweight(n, k, "fp8_block")  # group-wise scales: the dequantized reference
    check("fp8_w8a8 block-wise", impl("linear", "fp8_w8a8")(x, block), torch.nn.functional.linear(x, dense_of(block)))
