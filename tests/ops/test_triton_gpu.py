"""The Triton kernels on the GPU at Qwen3-0.6B's shapes (bf16): each against its native op, a CUDA graph of
the fused decode chain, torch.compile(fullgraph=True) over the ops, and the all_fused model against the
unfused one (teacher-forced logits, then greedy tokens). Run: pytest -m gpu tests/ops/test_triton_gpu.py
Rows > 1 use the untuned heuristic config (NANOVLLM_TRITON_TUNE=0) to keep tuning time down; one row tunes.
Kernels launch with PDL (programmatic dependent launch) as in the engine; weights are Parameters.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from nanovllm.ops import get_op, load_plugins, native_site
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from tests.helpers import ROOT

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
H, HQ, HK, D, INTER, VOCAB, EPS = 1024, 16, 8, 128, 3072, 151936, 1e-6
BF16 = dict(atol=2e-2, rtol=2e-2)
PROJ = {"qkv": ((HQ + 2 * HK) * D, H), "o_proj": (H, HQ * D), "gate_up": (2 * INTER, H), "down": (H, INTER),
        "lm_head": (VOCAB, H)}


@pytest.fixture(scope="module")
def core():
    load_plugins()
    return sys.modules["nanovllm_plugins.triton._gemv_core"]


@pytest.fixture
def untuned(rows, monkeypatch):
    if rows > 1:
        monkeypatch.setenv("NANOVLLM_TRITON_TUNE", "0")


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda").mul_(scale).bfloat16()


def param(*shape, scale=0.02):
    """A weight as the model holds it (a Parameter: the GEMVs prefetch it before their PDL wait, which is
    only valid for memory no kernel in flight writes; the synchronize keeps that true here)."""
    w = torch.nn.Parameter(randn(*shape, scale=scale), requires_grad=False)
    torch.cuda.synchronize()
    return w


def triton_impl(op: str):
    return get_op(op).impls["triton"].fn


def report(name, got, want):
    err = (got.float() - want.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3g}, mean {err.mean().item():.3g}, "
          f"max |want| {want.float().abs().max().item():.3g}")


# -- kernels against their native ops ------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 4, 16, 40])
@pytest.mark.parametrize("proj", list(PROJ))
def test_linear(core, proj, rows, untuned):
    torch.manual_seed(0)
    n, k = PROJ[proj]
    x, w = randn(rows, k), param(n, k)
    bias = randn(n, scale=0.1) if proj == "qkv" else None
    got, want = triton_impl("linear")(x, w, bias), F.linear(x, w, bias)
    report(f"linear {proj} rows={rows}", got, want)
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("cfg", [(8, 1024, 2, 4, 1), (4, 512, 4, 2, 1), (32, 128, 4, 4, 3)])
def test_linear_split_k(core, cfg, serial):
    """Split-K, reduced by the sum kernel or (serial) in the launch by each tile's last program, on both paths
    (one row: FMA; four rows: tl.dot): right, and the same bits over many back-to-back launches (a program that
    read a partial before it was stored, or a counter left unreset, would show), the counters back at 0."""
    torch.manual_seed(1)
    rows = 1 if cfg[0] < 16 else 4
    x, w, res = randn(rows, INTER), randn(H, INTER, scale=0.02), randn(rows, H)
    with core.tuning.forced(core.tuning.Config(*cfg, SERIAL=serial)):
        runs = [torch.ops.nanovllm_triton.gemv(x, w, None, res, None, 0.0) for _ in range(50)]
    torch.testing.assert_close(runs[0], res + F.linear(x, w), **BF16)
    assert all(torch.equal(r, runs[0]) for r in runs)
    assert not core.split_counters(x, (1, 1, 1)).any()


@pytest.mark.parametrize("rows", [1, 5])
def test_norm_qkv(core, rows, untuned):
    torch.manual_seed(2)
    args = (randn(rows, H), randn(H, scale=0.1).add_(1), param(PROJ["qkv"][0], H), None, EPS)
    got, want = triton_impl("norm_qkv")(*args), native_site("norm_qkv")(*args)
    report(f"norm_qkv rows={rows}", got, want)
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("rows", [1, 256, 8191])
def test_norms_and_silu_and_mul(core, rows):
    """The many-rows fallbacks' one-kernel norms and SiLU * up at the model's widths; the residual sum is
    bit-exact (both round the fp32 sum once), q/k norms read strided head views of the packed QKV output."""
    torch.manual_seed(rows)
    x, r, w = randn(rows, H), randn(rows, H), randn(H, scale=0.1).add_(1)
    native = {op: get_op(op).native for op in ("rms_norm", "add_rms_norm", "silu_and_mul")}
    torch.testing.assert_close(triton_impl("rms_norm")(x, w, EPS), native["rms_norm"](x, w, EPS), **BF16)
    (normed, s), (want_normed, want_s) = triton_impl("add_rms_norm")(x, r, w, EPS), native["add_rms_norm"](x, r, w, EPS)
    assert torch.equal(s, want_s)
    report(f"add_rms_norm rows={rows}", normed, want_normed)
    torch.testing.assert_close(normed, want_normed, **BF16)
    qkv, qw = randn(rows, (HQ + 2 * HK) * D), randn(D, scale=0.1).add_(1)
    q = qkv[:, :HQ * D].view(rows, HQ, D)
    torch.testing.assert_close(triton_impl("rms_norm")(q, qw, EPS), native["rms_norm"](q, qw, EPS), **BF16)
    gate_up = randn(rows, 2 * INTER, scale=3)
    torch.testing.assert_close(triton_impl("silu_and_mul")(gate_up), native["silu_and_mul"](gate_up), **BF16)


def test_sample_race(core):
    """Temperature sampling at the throughput workload's shape (256 rows of Qwen3's vocabulary, bf16 logits)
    picks the native's tokens from the same noise; greedy rows (T = 0) exactly. The two formulas round
    differently, so a near-tie may flip: at most one row of 256."""
    torch.manual_seed(6)
    logits = randn(256, VOCAB, scale=4)
    temperature = torch.rand(256, device="cuda") + 0.1
    temperature[::7] = 0
    noise = torch.empty(256, VOCAB, device="cuda").exponential_()
    want = get_op("sample").native(logits, temperature, None, None, None, noise)
    got = triton_impl("sample")(logits, temperature, None, None, None, noise)
    assert torch.equal(got[::7], want[::7])
    assert (got != want).sum().item() <= 1


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("residual", [False, True])
def test_mlp(core, rows, residual, untuned):
    """The site reads interleaved gate/up rows (its load-time layout); 40 rows take the prefill path."""
    torch.manual_seed(3)
    args = (randn(rows, H), param(2 * INTER, H), param(H, INTER),
            randn(rows, H) if residual else None)
    interleaved = torch.nn.Parameter(get_op("mlp").impls["triton"].layouts["gate_up_w"](args[1]), requires_grad=False)
    got, want = triton_impl("mlp")(args[0], interleaved, *args[2:]), native_site("mlp")(*args)
    report(f"mlp rows={rows}", got, want)
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("rows", [1, 5])
def test_attn_out(core, rows, untuned, backend="triton"):
    """Repeated: a stale read (or, for a one-pass `backend`, a counter left non-zero) would show."""
    torch.manual_seed(4)
    args = (randn(rows, HQ * D), param(H, HQ * D), randn(rows, H), randn(H, scale=0.1).add_(1), EPS)
    for _ in range(3):
        (normed, res) = get_op("attn_out").impls[backend].fn(*args)
    want_normed, want_res = native_site("attn_out")(*args)
    report(f"attn_out {backend} rows={rows}", normed, want_normed)
    torch.testing.assert_close(res, want_res, **BF16)
    torch.testing.assert_close(normed, want_normed, **BF16)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("sampled", [False, True])
def test_lm_head_sample(core, rows, sampled, untuned):
    torch.manual_seed(5)
    h, norm_w, lm_w = randn(rows, H), randn(H, scale=0.1).add_(1), param(VOCAB, H)
    temperature = torch.zeros(rows, device="cuda") if not sampled else torch.rand(rows, device="cuda") + 0.5
    temperature[0] = 0.0
    noise = torch.empty(rows, VOCAB, device="cuda").exponential_() if sampled else None
    sampling = (temperature, torch.full((rows,), -1, device="cuda"), torch.ones(rows, device="cuda"),
                torch.zeros(rows, device="cuda"), noise)
    got = triton_impl("lm_head_sample")(h, norm_w, EPS, lm_w, *sampling)
    want = native_site("lm_head_sample")(h, norm_w, EPS, lm_w, *sampling)
    logits = F.linear(get_op("rms_norm").native(h, norm_w, EPS), lm_w).float()
    gap = logits.max(-1).values - logits.gather(1, got[:, None])[:, 0]
    print(f"lm_head_sample rows={rows} sampled={sampled}: got {got.tolist()} want {want.tolist()} gap {gap.tolist()}")
    greedy = temperature == 0
    assert (gap[greedy] <= 0.02 * logits.abs().max()).all()  # the argmax up to a bf16 rounding near-tie
    if sampled:
        assert (got[~greedy] == want[~greedy]).all()


def paged_meta(kv_lens, page=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-k // page) for k in kv_lens)
    perm = torch.randperm(len(kv_lens) * width + 1, generator=g)
    tables = perm[:len(kv_lens) * width].view(len(kv_lens), width).tolist()
    return build_metadata(tables, kv_lens, page).to_device("cuda"), len(kv_lens) * width + 1


@pytest.mark.parametrize("kv_lens", [[1], [128], [4100], [1, 300, 17, 4100]])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (256, 0.0), (0, 30.0)])
def test_attention_decode(core, kv_lens, window, softcap, backend="triton"):
    torch.manual_seed(6)
    meta, blocks = paged_meta(kv_lens)
    kc, vc, q = randn(blocks, 16, HK, D), randn(blocks, 16, HK, D), randn(len(kv_lens), HQ, D)
    for _ in range(3):  # repeated: a one-pass `backend` relies on counters every launch leaves at zero
        got = get_op("attention_decode").impls[backend].fn(q, kc, vc, meta, D ** -0.5, window, softcap)
    want = get_op("attention_decode").native(q, kc, vc, meta, D ** -0.5, window, softcap)
    report(f"attention_decode {kv_lens} window={window} softcap={softcap}", got, want)
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("kv_lens", [[1], [128], [4100], [1, 300, 17, 4100], [513] * 256])
def test_rope_decode_attention(core, kv_lens, backend="triton"):
    """q/k norm + RoPE + KV write fused into decode attention, against qk_norm_rope then attention_decode
    (natives) at the model's heads: the output and both caches; raw q, k, v are views of a packed QKV."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 1e6

    torch.manual_seed(13)
    meta, blocks = paged_meta(kv_lens)
    b = len(kv_lens)
    qkv = randn(b, (HQ + 2 * HK) * D)
    q, k, v = (t.view(b, -1, D) for t in qkv.split((HQ * D, HK * D, HK * D), -1))
    norms = randn(D, scale=0.1).add_(1), randn(D, scale=0.1).add_(1)
    table = cos_sin_table(Rope(), D, 8192).cuda()
    kc, vc = randn(blocks, 16, HK, D), randn(blocks, 16, HK, D)
    caches = [kc.clone(), vc.clone(), kc, vc]
    for _ in range(3):  # repeated: a one-pass `backend` relies on counters every launch leaves at zero
        got = get_op("rope_decode_attention").impls[backend].fn(q, k, v, *norms, EPS, meta.positions, table,
                                                                 caches[0], caches[1], meta, D ** -0.5, 0, 0.0)
    want = native_site("rope_decode_attention")(q, k, v, *norms, EPS, meta.positions, table, caches[2], caches[3],
                                                meta, D ** -0.5, 0, 0.0)
    report(f"rope_decode_attention {kv_lens[:4]} {backend}", got, want)
    torch.testing.assert_close(got, want, **BF16)
    torch.testing.assert_close(caches[0], caches[2], **BF16)
    assert torch.equal(caches[1], caches[3])


def layer_against_native(backend: str, kv_len: int):
    """Backend `backend` of decode_layer at the model's shapes against the native composition of the layer's
    sites (the new residual stream and both caches). Returns (state, the backend's inputs up to the caches,
    its output)."""
    torch.manual_seed(kv_len)
    s = chain_state(kv_len)
    layer = get_op("decode_layer").impls[backend]
    weights = LayerWeights(s["in_norm"], s["qkv_w"], None, s["q_norm"], s["k_norm"], s["o_w"], s["post_norm"],
                           s["gate_up_w"], s["down_w"])
    laid_out = weights._replace(gate_up_w=layer.layouts["gate_up_w"](s["gate_up_w"]))
    settings, rest = AttentionSettings(EPS, D ** -0.5), (s["meta"].positions, s["table"])
    kc, vc = s["kc"].clone(), s["vc"].clone()
    inputs = (s["x"], laid_out, settings, *rest, kc, vc)
    got = layer.fn(*inputs, s["meta"])
    want = native_site("decode_layer")(s["x"], weights, settings, *rest, s["kc"], s["vc"], s["meta"])
    report(f"decode_layer {backend} kv_len={kv_len}", got, want)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(kc, s["kc"], **BF16)
    torch.testing.assert_close(vc, s["vc"], **BF16)
    return s, inputs, got


@pytest.mark.parametrize("kv_len", [1, 129, 4100])
def test_decode_layer_chain(core, kv_len):
    """all_fused's five-launch chain against the native layer, and replayed in a graph."""
    s, inputs, got = layer_against_native("triton_chain", kv_len)
    layer = get_op("decode_layer").impls["triton_chain"]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = layer.fn(*inputs, s["meta"])
    for _ in range(5):  # the same step again: rewrites the same K/V slot with the same values
        graph.replay()
        assert torch.equal(replayed, got)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_qk_norm_rope(core, tokens):
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 1e6

    torch.manual_seed(7)
    qkv = randn(tokens, (HQ + 2 * HK) * D)
    q, k, v = (t.view(tokens, -1, D) for t in qkv.split((HQ * D, HK * D, HK * D), -1))
    norms = randn(D, scale=0.1).add_(1), randn(D, scale=0.1).add_(1)
    pos = torch.randint(0, 4000, (tokens,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:tokens]
    table = cos_sin_table(Rope(), D, 4096).cuda()
    caches = [torch.zeros(64, 16, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    got = triton_impl("qk_norm_rope")(q, k, v, *norms, EPS, pos, table, caches[0], caches[1], slots)
    want = native_site("qk_norm_rope")(q, k, v, *norms, EPS, pos, table, caches[2], caches[3], slots)
    torch.testing.assert_close(got, want, **BF16)
    torch.testing.assert_close(caches[0], caches[2], **BF16)
    assert torch.equal(caches[1], caches[3])


# -- capture (torch.compile is the last test) ---------------------------------------------------------
def decode_chain(s, ops):
    """One decode layer's fused ops plus the greedy head, as the model calls them (batch 1)."""
    qkv = ops["norm_qkv"](s["x"], s["in_norm"], s["qkv_w"], None, EPS)
    q, k, v = qkv.split((HQ * D, HK * D, HK * D), -1)
    q = ops["qk_norm_rope"](q.view(1, HQ, D), k.view(1, HK, D), v.view(1, HK, D), s["q_norm"], s["k_norm"], EPS,
                            s["meta"].positions, s["table"], s["kc"], s["vc"], s["meta"].slot_mapping)
    o = ops["attention_decode"](q, s["kc"], s["vc"], s["meta"], D ** -0.5, 0, 0.0)
    h, res = ops["attn_out"](o.flatten(1), s["o_w"], s["x"], s["post_norm"], EPS)
    y = ops["mlp"](h, s["gate_up_w"], s["down_w"], res)
    return y, ops["lm_head_sample"](y, s["in_norm"], EPS, s["lm_w"], None, None, None, None, None)


CHAIN_OPS = ("norm_qkv", "qk_norm_rope", "attention_decode", "attn_out", "mlp", "lm_head_sample")


def chain_state(kv_len: int = 300):
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 1e6

    meta, blocks = paged_meta([kv_len])
    return dict(x=randn(1, H), in_norm=randn(H, scale=0.1).add_(1), qkv_w=param(PROJ["qkv"][0], H),
                q_norm=randn(D, scale=0.1).add_(1), k_norm=randn(D, scale=0.1).add_(1), meta=meta,
                table=cos_sin_table(Rope(), D, 8192).cuda(), kc=randn(blocks, 16, HK, D), vc=randn(blocks, 16, HK, D),
                o_w=param(H, HQ * D), post_norm=randn(H, scale=0.1).add_(1),
                gate_up_w=param(2 * INTER, H), down_w=param(H, INTER),
                lm_w=param(VOCAB, H))


def test_decode_chain_in_a_cuda_graph(core):
    torch.manual_seed(8)
    s, ops = chain_state(), {op: triton_impl(op) for op in CHAIN_OPS}
    decode_chain(s, ops)  # tune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, tok_graph = decode_chain(s, ops)
    s["x"].copy_(randn(1, H))  # new inputs, same buffers
    kc0, vc0 = s["kc"].clone(), s["vc"].clone()
    graph.replay()
    s["kc"].copy_(kc0), s["vc"].copy_(vc0)
    y, tok = decode_chain(s, ops)
    torch.testing.assert_close(y_graph, y, atol=0, rtol=0)
    assert torch.equal(tok_graph, tok)


# -- the whole model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    import yaml

    from nanovllm import LLM

    kernels = yaml.safe_load((ROOT / "configs/kernels/all_fused.yaml").read_text())
    common = dict(max_model_len=1024, num_kvcache_blocks=256, max_num_seqs=4)
    ref = LLM("default", **common)
    fused = LLM("default", kernels=kernels, **common)
    yield ref, fused
    ref.close()
    fused.close()


def engine_over_all_fused(ops: dict, plugin_dirs=()):
    """An engine of the default model with all_fused's table, `ops` over it."""
    import yaml

    from nanovllm import LLM

    kernels = yaml.safe_load((ROOT / "configs/kernels/all_fused.yaml").read_text())
    kernels["ops"].update(ops)
    kernels["plugin_dirs"] = [str(d) for d in plugin_dirs]
    return LLM("default", kernels=kernels, max_model_len=1024, num_kvcache_blocks=256, max_num_seqs=4)


@pytest.fixture(scope="module")
def sites_in_a_row(engines):
    """all_fused with each layer's decode step as its four sites in a row (not the five-launch chain)."""
    llm = engine_over_all_fused({"decode_layer": "eager"})
    yield llm
    llm.close()


def check_teacher_forced_logits(ref, fused, name):
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    g = torch.Generator().manual_seed(10)
    prompt = torch.randint(0, 151000, (40,), generator=g).tolist()
    forced = torch.randint(0, 151000, (12,), generator=g).tolist()
    want = teacher_forced_logits(ref.engine, prompt, forced)
    got = teacher_forced_logits(fused.engine, prompt, forced)
    err = (got - want).abs()
    scale = want.abs().max().item()
    cos = F.cosine_similarity(got, want, dim=-1)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{name} vs eager: max abs err {err.max().item():.4g} (max |logit| {scale:.4g}), mean {err.mean():.3g}, "
          f"min cosine {cos.min().item():.6f}, argmax agreement {agree:.2f}")
    assert cos.min() > 0.999
    assert err.max() <= 0.05 * scale + 0.02


def check_greedy_tokens(ref, fused, name):
    """Tokens from the fused greedy head (lm_head_sample), each checked as a (near-)argmax of the eager model."""
    from nanovllm import SamplingParams
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    prompt = torch.randint(0, 151000, (24,), generator=torch.Generator().manual_seed(11)).tolist()
    tokens = fused.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]["token_ids"]
    logits = teacher_forced_logits(ref.engine, prompt, tokens[:-1])
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    gap = logits.max(-1).values - chosen
    print(f"{name} greedy tokens {tokens}; eager logit gap to the max {gap.tolist()}")
    assert (gap <= 0.05 * logits.abs().max() + 0.02).all()


def test_all_fused_teacher_forced_logits(engines):
    ref, fused = engines
    table = fused.engine.runner.resolver.table
    assert all(table["0"][op] == "triton" for op in ("norm_qkv", "qk_norm_rope", "attn_out", "mlp",
                                                     "attention_decode")), table["0"]
    assert table["0"]["decode_layer"] == "triton_chain"
    check_teacher_forced_logits(ref, fused, "all_fused")


def test_all_fused_greedy_tokens(engines):
    check_greedy_tokens(*engines, "all_fused")


def test_async_graph_steps_match_synchronous_ones(engines):
    """Steps launched ahead (inputs copied in on a side stream, the input ids those the graph before left,
    tokens copied out on another stream) give exactly the synchronous engine's tokens: a batch of 3 whose
    rows finish at different lengths (the rows kept then copied, not chained), then one request alone. A first
    round fills the prefix cache, so the two compared prefill the same uncached tails."""
    from nanovllm import SamplingParams

    fused = engines[1]
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (5, 33, 70)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (64, 20, 41)]
    config, out = fused.engine.config, []
    try:
        for asynchronous in (False, False, True):
            config.async_scheduling = asynchronous
            out.append(([r["token_ids"] for r in fused.generate(prompts, params)],
                        fused.generate(prompts[1:2], params[0])[0]["token_ids"]))
    finally:
        config.async_scheduling = True
    assert out[2] == out[1]


def test_sites_in_a_row_model(engines, sites_in_a_row):
    """all_fused's sites one after another in the engine (all_fused itself runs the five-launch chain): eager
    decode steps (teacher forcing) and the CUDA graphs."""
    assert sites_in_a_row.engine.runner.resolver.table["0"]["decode_layer"] == "eager"
    check_teacher_forced_logits(engines[0], sites_in_a_row, "all_fused, decode_layer eager")
    check_greedy_tokens(engines[0], sites_in_a_row, "all_fused, decode_layer eager")


def test_all_fused_sampled_decode_graph(engines):
    """Temperature sampling runs in the sampled decode graph: at a near-zero temperature every row's token is
    a (near-)argmax of the eager model (ties are common in bf16 logits of random weights, so not the greedy
    tokens themselves), in a batch of 3; a seed gives the same tokens twice, other seeds other tokens."""
    from nanovllm import SamplingParams
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    ref, fused = engines
    graphs, modes = fused.engine.runner.graphs, []
    run = graphs.run
    graphs.run = lambda batch, prev=None, sampled=False: modes.append(sampled) or run(batch, prev, sampled)
    try:
        g = torch.Generator().manual_seed(12)
        prompts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (9, 30, 17)]
        cold = fused.generate(prompts, SamplingParams(temperature=1e-4, seed=1, max_tokens=8, ignore_eos=True))
        hot = [fused.generate(prompts, SamplingParams(temperature=1.0, seed=s, max_tokens=8, ignore_eos=True))
               for s in (5, 5, 6)]
    finally:
        graphs.run = run
    assert True in modes
    for prompt, out in zip(prompts, cold):
        tokens = out["token_ids"]
        logits = teacher_forced_logits(ref.engine, prompt, tokens[:-1])
        gap = logits.max(-1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (gap <= 0.05 * logits.abs().max() + 0.02).all(), gap
    assert hot[0] == hot[1] and hot[0] != hot[2]


def test_torch_compile_fullgraph(core):
    """Last: inductor compile time. Triton ops trace as torch ops (triton_op + wrap_triton), no graph break."""
    torch.manual_seed(9)
    s, ops = chain_state(), {op: triton_impl(op) for op in CHAIN_OPS}
    want = decode_chain(dict(s, kc=s["kc"].clone(), vc=s["vc"].clone()), ops)
    compiled = torch.compile(decode_chain, fullgraph=True)
    got = compiled(dict(s, kc=s["kc"].clone(), vc=s["vc"].clone()), ops)
    torch.testing.assert_close(got[0], want[0], **BF16)
    assert torch.equal(got[1], want[1])


def test_norm_apart_under_torch_compile(core):
    """Five rows with an RMSNorm prologue: the norm runs as its own op before the GEMV (norm_apart), and a
    fullgraph compile traces the op inside the op."""
    torch.manual_seed(10)
    x, nw = randn(5, H), randn(H, scale=0.1).add_(1)
    qkv_w, gate_up_w = param(PROJ["qkv"][0], H), param(2 * INTER, H)

    def f(x):
        ops = torch.ops.nanovllm_triton
        return ops.gemv(x, qkv_w, None, None, nw, EPS), ops.gate_up_silu(x, gate_up_w, nw, EPS)

    want = f(x)
    got = torch.compile(f, fullgraph=True)(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **BF16)
