"""The FlashInfer backends against the native ops, on fresh random inputs (GPU only: run with -m gpu).

Model shapes (Qwen3-0.6B: 16 query heads, 8 KV heads, head_dim 128, hidden 1024, bf16) and odd ones;
batches 1, 3, 17, 64; random block tables with shuffled block ids; prefill behind cached prefixes;
sliding windows; the custom ops under torch.compile(fullgraph=True); decode replayed from a CUDA graph with
a new plan between replays; cascade decode against plain decode on a shared-prefix batch; an engine's
decode graphs over the short block table against its full-width ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.ops import AttentionMetadata, PlanContext, get_op, load_plugins
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.testing import random_step
from nanovllm.utils.cuda_graph import capture
from tests.helpers import ROOT

pytestmark = pytest.mark.gpu

HQ, HK, D, BS = 16, 8, 128, 16
SCALE = D ** -0.5
BF16 = dict(atol=1e-2, rtol=2e-2)


# --- plain-PyTorch references and inputs -----------------------------------------------------------------------

def native(op: str):
    return get_op(op).native


def impl(op: str, backend: str = "flashinfer"):
    load_plugins()
    return get_op(op).impls[backend]


def make_step(q_lens, kv_lens, *, shared_blocks: int = 0, seed: int = 0, device: str = "cuda"):
    return random_step(q_lens, kv_lens, block_size=BS, shared_blocks=shared_blocks, seed=seed, device=device)


def pad_for_graph(meta: AttentionMetadata, graph_batch: int, scratch: int) -> AttentionMetadata:
    """A decode step padded as the model runner pads a CUDA-graph step: extra rows of seq_len 1 whose one
    block is the scratch block."""
    host = meta.host
    tables = [row[:n] for row, n in zip(host["block_tables"], host["num_blocks"])]
    padded = build_metadata(tables, host["seq_lens"], BS, rows=graph_batch, width=host["block_tables"].shape[1],
                            scratch_block=scratch).host
    return AttentionMetadata(meta.positions, meta.slot_mapping, meta.seq_lens, meta.block_tables, meta.cu_seqlens_q,
                             meta.pad_index, 1, meta.max_seqlen_k, host=padded, graph_batch=graph_batch)


def plan_context(windows=(0,), softcap=0.0, device="cuda", max_model_len=4096, heads=(HQ, HK)) -> PlanContext:
    return PlanContext(num_qo_heads=heads[0], num_kv_heads=heads[1], head_dim=D, page_size=BS, dtype=torch.bfloat16,
                       device=torch.device(device), max_num_seqs=64, max_model_len=max_model_len,
                       windows=tuple(windows), softcap=softcap)


def kv_cache(num_blocks: int, seed: int = 0, device: str = "cuda", kv_heads: int = HK):
    g = torch.Generator(device).manual_seed(seed)
    shape = (num_blocks + 1, BS, kv_heads, D)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16),
            torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16))


def queries(n: int, seed: int = 1, device: str = "cuda", heads: int = HQ) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(n, heads, D, generator=g, device=device, dtype=torch.bfloat16)


def decode_lens(batch: int, seed: int = 0) -> list[int]:
    lens = np.random.default_rng(seed).integers(1, 700, batch).tolist()
    return ([1, 16, 17] + lens[3:]) if batch >= 3 else lens  # page-boundary lengths included


def cos_sin_table(positions: int = 4096, theta: float = 1e6) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def filtered_probs(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The distribution the native sampler draws from (one row): softmax(logits / T) with top-k, top-p
    (smallest set reaching top_p) and min-p (relative to the top token) applied to the full softmax."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    p = probs[order]
    keep = (torch.arange(len(p), device=p.device) < (top_k if top_k > 0 else len(p)))
    keep &= (p.cumsum(0) - p) < top_p
    keep &= p >= min_p * p[0]
    out = torch.zeros_like(probs)
    out[order] = torch.where(keep, p, 0.0)
    return out / out.sum()


# --- attention ---------------------------------------------------------------------------------------------------

def run_attention(op, backend, meta, num_blocks, windows, window, scale=SCALE, seed=0, heads=(HQ, HK)):
    kc, vc = kv_cache(num_blocks, seed, kv_heads=heads[1])
    q = queries(int(meta.cu_seqlens_q[-1]), seed + 1, heads=heads[0])
    i = impl(op, backend)
    i.plan(meta, plan_context(windows, heads=heads))
    got = i.fn(q, kc, vc, meta, scale, window, 0.0)
    want = native(op)(q, kc, vc, meta, scale, window, 0.0)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **BF16)
    return got


@pytest.mark.parametrize("backend", ["flashinfer", "flashinfer_tc"])
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_decode(batch, window, backend):
    lens = decode_lens(batch, seed=batch)
    meta, nb = make_step([1] * batch, lens, seed=batch)
    run_attention("attention_decode", backend, meta, nb, (0, window) if window else (0,), window)


def test_decode_planner_serves_engines_of_other_head_groups():
    """The planner outlives an engine: after a group of 3 (CUDA cores), a group of 7 needs tensor cores (the
    CUDA-core kernel has no group of 7), and a longer max_model_len needs larger graph buffers."""
    meta, nb = make_step([1] * 3, [5, 40, 300])
    for heads in [(9, 3), (14, 2), (16, 16)]:
        run_attention("attention_decode", "flashinfer", meta, nb, (0,), 0, heads=heads)
    planner = impl("attention_decode").plan
    small, large = (planner.wrapper(plan_context(max_model_len=n), 0, 4) for n in (1024, 8192))
    assert small is not large


@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("q_lens,kv_lens", [
    ([5, 100, 33], [5, 100, 33]),             # fresh prompts
    ([7, 1, 50], [300, 17, 64]),              # behind cached prefixes (one a single token)
    ([512], [1000]),                          # a chunk of a long prompt
    ([1] * 3 + [9, 130, 16, 17], [40, 1, 2, 9, 400, 33, 17]),
])
def test_prefill(q_lens, kv_lens, window):
    meta, nb = make_step(q_lens, kv_lens, seed=len(q_lens))
    run_attention("attention_prefill", "flashinfer", meta, nb, (0, window) if window else (0,), window)


@pytest.mark.parametrize("op,q_lens,kv_lens", [("attention_decode", [1, 1, 1], [5, 300, 64]),
                                               ("attention_prefill", [4, 20], [40, 20])])
def test_non_default_scale(op, q_lens, kv_lens):
    meta, nb = make_step(q_lens, kv_lens)
    run_attention(op, "flashinfer", meta, nb, (0,), 0, scale=0.05)


def test_plan_hook_forgets_the_other_step_kind():
    """A prefill step drops the decode plan, so a stale plan can never run."""
    meta, nb = make_step([1, 1], [9, 30])
    run_attention("attention_decode", "flashinfer", meta, nb, (0,), 0)
    prefill_meta, _ = make_step([3, 2], [9, 30])
    impl("attention_decode").plan(prefill_meta, plan_context())
    kc, vc = kv_cache(nb)
    with pytest.raises(RuntimeError, match="no FlashInfer plan"):
        impl("attention_decode").fn(queries(2), kc, vc, meta, SCALE, 0, 0.0)


@pytest.mark.parametrize("window", [0, 37])
def test_cascade_matches_plain_decode(window):
    windows = (0, window) if window else (0,)
    lens = [20 * BS + n for n in np.random.default_rng(3).integers(1, 100, 16).tolist()]
    meta, nb = make_step([1] * 16, lens, shared_blocks=20, seed=3)
    plain = run_attention("attention_decode", "flashinfer", meta, nb, windows, window)
    cascade = run_attention("attention_decode", "flashinfer_cascade", meta, nb, windows, window)
    assert impl("attention_decode", "flashinfer_cascade").plan.last_shared_blocks == 20
    torch.testing.assert_close(cascade, plain, **BF16)


def test_cascade_without_shared_prefix_plans_plain_decode():
    meta, nb = make_step([1] * 8, decode_lens(8))
    run_attention("attention_decode", "flashinfer_cascade", meta, nb, (0,), 0)
    assert impl("attention_decode", "flashinfer_cascade").plan.last_shared_blocks == 0


@pytest.mark.parametrize("backend", ["flashinfer", "flashinfer_tc"])
def test_decode_cuda_graph_replays_with_new_plans(backend):
    """Capture at graph batch 8 with 5 real requests, then replay for other steps (other lengths, other
    blocks, 8 real requests) after planning each one outside the graph."""
    graph_batch, num_blocks = 8, 400
    kc, vc = kv_cache(num_blocks)
    i = impl("attention_decode", backend)
    ctx = plan_context()
    q_static = torch.zeros(graph_batch, HQ, D, device="cuda", dtype=torch.bfloat16)

    def step(batch, seed):
        meta, nb = make_step([1] * batch, decode_lens(batch, seed), seed=seed)
        assert nb <= num_blocks
        q_static.zero_()
        q_static[:batch] = queries(batch, seed)
        padded = pad_for_graph(meta, graph_batch, scratch=num_blocks)
        i.plan(padded, ctx)
        return meta, padded

    meta, padded = step(5, 10)
    graph, out_static = capture(lambda: i.fn(q_static, kc, vc, padded, SCALE, 0, 0.0))
    for batch, seed in ((5, 10), (3, 11), (8, 12), (5, 13)):
        meta, padded = step(batch, seed)
        graph.replay()
        want = native("attention_decode")(q_static[:batch], kc, vc, meta, SCALE, 0, 0.0)
        torch.testing.assert_close(out_static[:batch], want, **BF16)


# --- norms, RoPE, activation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 17, 64])
@pytest.mark.parametrize("hidden", [1024, 1000])
def test_rms_norm(n, hidden):
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) * 3
    w = 1 + 0.2 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(impl("rms_norm").fn(x, w, 1e-6), native("rms_norm")(x, w, 1e-6), **BF16)


@pytest.mark.parametrize("n", [1, 17, 64])
def test_rms_norm_per_head_on_strided_view(n):
    """q/k norm: (N, heads, head_dim) views of the packed QKV output."""
    qkv = torch.randn(n, (HQ + 2 * HK) * D, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :HQ * D].view(n, HQ, D)
    k = qkv[:, HQ * D:(HQ + HK) * D].view(n, HK, D)
    w = 1 + 0.2 * torch.randn(D, device="cuda", dtype=torch.bfloat16)
    for t in (q, k):
        torch.testing.assert_close(impl("rms_norm").fn(t, w, 1e-6), native("rms_norm")(t, w, 1e-6), **BF16)


@pytest.mark.parametrize("n", [1, 3, 17, 64])
def test_add_rms_norm_is_functional(n):
    x = torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.2 * torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x0, r0 = x.clone(), r.clone()
    normed, s = impl("add_rms_norm").fn(x, r, w, 1e-6)
    want_normed, want_s = native("add_rms_norm")(x0, r0, w, 1e-6)
    torch.testing.assert_close(s, want_s, atol=0, rtol=0)
    torch.testing.assert_close(normed, want_normed, **BF16)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be modified"


@pytest.mark.parametrize("n", [1, 3, 17, 64])
def test_rope(n):
    qkv = torch.randn(n, (HQ + 2 * HK) * D, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :HQ * D].view(n, HQ, D)
    k = qkv[:, HQ * D:(HQ + HK) * D].view(n, HK, D)
    positions = torch.randint(0, 4096, (n,), device="cuda")
    cos_sin = cos_sin_table().cuda()
    got = impl("rope").fn(q, k, positions, cos_sin)
    want = native("rope")(q, k, positions, cos_sin)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **BF16)


@pytest.mark.parametrize("n", [1, 3, 17, 64])
@pytest.mark.parametrize("inter", [3072, 776])
def test_silu_and_mul(n, inter):
    x = torch.randn(n, 2 * inter, device="cuda", dtype=torch.bfloat16) * 2
    torch.testing.assert_close(impl("silu_and_mul").fn(x), native("silu_and_mul")(x), **BF16)


def test_elementwise_ops_in_a_cuda_graph():
    """Each custom op launches on the current stream, so it records into a graph and replays on new data."""
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    q, k = torch.randn(4, HQ, D, device="cuda", dtype=torch.bfloat16), torch.randn(4, HK, D, device="cuda",
                                                                                   dtype=torch.bfloat16)
    pos, cos_sin, gu = torch.arange(4, device="cuda"), cos_sin_table().cuda(), torch.randn_like(x)
    rms_norm, add_rms_norm, rope, silu_and_mul = (impl(op).fn for op in ("rms_norm", "add_rms_norm", "rope",
                                                                         "silu_and_mul"))

    def f():
        return rms_norm(x, w, 1e-6), *add_rms_norm(x, r, w, 1e-6), *rope(q, k, pos, cos_sin), silu_and_mul(gu)

    def ref():
        return (native("rms_norm")(x, w, 1e-6), *native("add_rms_norm")(x, r, w, 1e-6),
                *native("rope")(q, k, pos, cos_sin), native("silu_and_mul")(gu))

    graph, outs = capture(f)
    for t in (x, r, q, k, gu):
        t.copy_(torch.randn_like(t))
    pos.copy_(torch.tensor([7, 4000, 1, 100], device="cuda"))
    graph.replay()
    for got, want in zip(outs, ref()):
        torch.testing.assert_close(got, want, **BF16)


def test_ops_under_torch_compile_fullgraph():
    meta, nb = make_step([1] * 3, [40, 1, 300])
    kc, vc = kv_cache(nb)
    impl("attention_decode").plan(meta, plan_context())
    x, r = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16), torch.randn(3, 1024, device="cuda",
                                                                                 dtype=torch.bfloat16)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    q, k = queries(3), torch.randn(3, HK, D, device="cuda", dtype=torch.bfloat16)
    cos_sin = cos_sin_table().cuda()
    gu = torch.randn(3, 2 * 1024, device="cuda", dtype=torch.bfloat16)
    fns = {op: impl(op).fn for op in ("add_rms_norm", "rms_norm", "rope", "attention_decode", "silu_and_mul")}

    def f(x, r, q, k, gu, meta):  # the impls are resolved outside: the registry is not traced
        h, s = fns["add_rms_norm"](x, r, w, 1e-6)
        qn = fns["rms_norm"](q, w[:D], 1e-6)
        qr, kr = fns["rope"](qn, k, meta.positions, cos_sin)
        o = fns["attention_decode"](qr, kc, vc, meta, SCALE, 0, 0.0)
        return h, s, kr, o, fns["silu_and_mul"](gu)

    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x, r, q, k, gu, meta), f(x, r, q, k, gu, meta)):
        torch.testing.assert_close(got, want, **BF16)


# --- sampling -----------------------------------------------------------------------------------------------------

def sampling_params(rows, temperature, top_k, top_p, min_p):
    full = dict(device="cuda")
    return (torch.full((rows,), temperature, **full), torch.full((rows,), top_k, dtype=torch.long, **full),
            torch.full((rows,), top_p, **full), torch.full((rows,), min_p, **full))


def test_sample_greedy_rows_are_exact_argmax():
    logits = torch.randn(64, 151936, device="cuda", dtype=torch.bfloat16)
    t, k, p, m = sampling_params(64, 0.8, 50, 0.9, 0.0)
    t[::3] = 0
    noise = torch.empty(64, 151936, device="cuda").exponential_()
    assert torch.equal(impl("sample").fn(logits, t, k, p, m, None), logits.argmax(-1))
    got = impl("sample").fn(logits, t, k, p, m, noise)
    assert got.dtype == torch.long
    assert torch.equal(got[::3], logits.argmax(-1)[::3])


@pytest.mark.parametrize("params", [(0.7, 10, 0.9, 0.02), (1.0, 0, 0.6, 0.0), (1.3, 5, 1.0, 0.1), (1.0, 0, 1.0, 0.0)])
def test_sample_distribution_matches_native(params):
    """Empirical frequencies over 50k draws from one row of logits vs the native's filtered distribution
    (expected total-variation distance of the sampling noise alone: under 0.01)."""
    rows, vocab = 50000, 32
    row = torch.randn(vocab, device="cuda") * 2
    logits = row.expand(rows, vocab).contiguous()
    t, k, p, m = sampling_params(rows, *params)
    want = filtered_probs(row, *params).float()
    for fn in (impl("sample").fn, native("sample")):
        noise = torch.empty(rows, vocab, device="cuda").exponential_()
        samples = fn(logits, t, k, p, m, noise)
        freq = torch.bincount(samples, minlength=vocab).float() / rows
        assert (freq[want == 0] == 0).all(), "sampled a filtered-out token"
        assert 0.5 * (freq - want).abs().sum() < 0.03, (fn, freq, want)


# --- the engine --------------------------------------------------------------------------------------------------

def test_engine_short_context_graphs_give_the_full_width_tokens():
    """The `flashinfer` preset's decode graphs over the short block table give the tokens of the full-width
    graphs, also across the switch: the second row outgrows 2,048 tokens mid-generation, and its batch moves
    to the full-width graph (FlashInfer plans each step from the actual lengths: the same kernels, bit for bit)."""
    import yaml

    from nanovllm import LLM, SamplingParams

    kernels = yaml.safe_load((ROOT / "configs/kernels/flashinfer.yaml").read_text())
    prompts = [list(range(1000, 1100)), [7 + (i * 31) % 5000 for i in range(2030)]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens, widths = {}, {}
    for short in (2048, 0):
        llm = LLM("default", kernels=kernels, max_model_len=4096, max_num_seqs=4, num_kvcache_blocks=600,
                  short_context_graphs=short)
        graphs = llm.engine.runner.graphs
        widths[short] = set()
        graphs._meta = lambda b, w, host, t, meta=graphs._meta, seen=widths[short]: seen.add(w) or meta(b, w, host, t)
        tokens[short] = [r["token_ids"] for r in llm.generate(prompts, params)]
        llm.close()
    assert widths == {2048: {128, 256}, 0: {256}}
    assert tokens[2048] == tokens[0]
