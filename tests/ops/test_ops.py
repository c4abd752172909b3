"""Every backend this process can run on the CPU (compile for every op, sdpa for attention; the Triton kernels
too under TRITON_INTERPRET=1) against its op's native reference on fresh random inputs, odd shapes included."""

from __future__ import annotations

import pytest
import torch

from nanovllm.ops import OPS, Target, get_op, load_plugins, native_site, resolve
from nanovllm.ops.meta import kv_slots
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from nanovllm.ops.testing import random_step

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def compiled(op: str):
    parts = {p: get_op(p).native for p in get_op(op).parts}
    fn, used = resolve(op, "compile", Target("cpu", torch.float32), parts=parts)
    assert used == "compile"
    return fn


def paged_meta(q_lens, kv_lens, block_size=4, seed=0):
    """Random block tables for requests with `q_lens` new tokens at the end of `kv_lens` tokens."""
    return random_step(q_lens, kv_lens, block_size=block_size, seed=seed)[0]


def ref_attention(q, k_cache, v_cache, meta, scale, window=0, softcap=0.0):
    """Per-request loop with explicit causal masks: an independent oracle for the paged native."""
    out = []
    bs = k_cache.shape[1]
    for b in range(meta.num_seqs):
        lo, hi = meta.cu_seqlens_q[b], meta.cu_seqlens_q[b + 1]
        kl = int(meta.seq_lens[b])
        slots = kv_slots(meta.block_tables, b, torch.arange(kl), bs)
        k = k_cache.flatten(0, 1)[slots].double()
        v = v_cache.flatten(0, 1)[slots].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        qb = q[lo:hi].double()
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qpos = meta.positions[lo:hi][:, None]
        kpos = torch.arange(kl)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
        out.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v))
    return torch.cat(out).to(q.dtype)


@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 1], [5, 17, 33]), ([7, 1, 13], [7, 9, 30]), ([3], [3])])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 0.0), (0, 5.0)])
def test_paged_attention_native_against_loop(q_lens, kv_lens, window, softcap):
    torch.manual_seed(0)
    meta = paged_meta(q_lens, kv_lens)
    kc, vc = torch.randn(64, 4, 2, 8), torch.randn(64, 4, 2, 8)
    q = torch.randn(sum(q_lens), 6, 8)
    for name in ("attention_prefill", "attention_decode"):
        if name == "attention_decode" and max(q_lens) > 1:
            continue
        got = get_op(name).native(q, kc, vc, meta, 0.3, window, softcap)
        torch.testing.assert_close(got, ref_attention(q, kc, vc, meta, 0.3, window, softcap), **TOL[torch.float32])


@pytest.mark.parametrize("chunk", [1, 2])
def test_paged_attention_in_request_chunks(monkeypatch, chunk):
    """A gather budget smaller than the batch's K/V splits the requests into chunks of `chunk` rows (the
    native attention inside a 256-row decode graph); the answer stays the loop oracle's."""
    import nanovllm.ops.primitives as prim

    torch.manual_seed(4)
    q_lens, kv_lens = [7, 1, 13, 1, 2], [7, 9, 30, 40, 2]
    meta = paged_meta(q_lens, kv_lens)
    kc, vc, q = torch.randn(64, 4, 2, 8), torch.randn(64, 4, 2, 8), torch.randn(sum(q_lens), 6, 8)
    row = 6 * meta.block_tables.shape[1] * 4 * (8 + max(q_lens))
    monkeypatch.setattr(prim, "GATHER_ELEMENTS", chunk * row)
    got = prim.paged_attention(q, kc, vc, meta, 0.3, 6, 5.0)
    torch.testing.assert_close(got, ref_attention(q, kc, vc, meta, 0.3, 6, 5.0), **TOL[torch.float32])


@pytest.mark.parametrize("name,q_lens,kv_lens", [("attention_prefill", [7, 1, 13], [7, 9, 30]),
                                                 ("attention_decode", [1, 1, 1], [5, 17, 33])])
def test_compiled_attention_matches_native(name, q_lens, kv_lens):
    torch.manual_seed(2)
    meta = paged_meta(q_lens, kv_lens)
    kc, vc, q = torch.randn(64, 4, 2, 8), torch.randn(64, 4, 2, 8), torch.randn(sum(q_lens), 6, 8)
    expected = get_op(name).native(q, kc, vc, meta, 0.3, 6, 5.0)
    torch.testing.assert_close(compiled(name)(q, kc, vc, meta, 0.3, 6, 5.0), expected, **TOL[torch.float32])


def test_compiled_decode_layer_matches_native():
    """The whole-layer site under torch.compile (its parts native) against its native composition: the new
    residual stream and the K/V written, three requests decoding at once."""
    torch.manual_seed(3)
    meta = paged_meta([1, 1, 1], [5, 17, 33])
    h, hq, hk, d, inter = 40, 4, 2, 8, 52
    w = lambda *s: torch.randn(*s) * 0.2  # noqa: E731
    weights = LayerWeights(w(h) + 1, w((hq + 2 * hk) * d, h), None, w(d) + 1, w(d) + 1, w(h, hq * d), w(h) + 1,
                           w(2 * inter, h), w(h, inter))
    args = (torch.randn(3, h), weights, AttentionSettings(1e-6, 0.3, 6, 5.0), meta.positions, torch.randn(64, d))
    caches = [torch.randn(64, 4, hk, d) for _ in range(2)]
    copies = [c.clone() for c in caches]
    expected = native_site("decode_layer")(*args, *caches, meta)
    parts = {p: native_site(p) for p in get_op("decode_layer").parts}
    fn, used = resolve("decode_layer", "compile", Target("cpu", torch.float32), parts=parts)
    assert used == "compile"
    torch.testing.assert_close(fn(*args, *copies, meta), expected, **TOL[torch.float32])
    for got, want in zip(copies, caches):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_rope_matches_transformers_rotate_half():
    from nanovllm.layers.rotary import cos_sin_table

    class Cfg:
        rope_theta = 10000.0

    torch.manual_seed(1)
    q, k, pos = torch.randn(9, 3, 10), torch.randn(9, 1, 10), torch.randint(0, 50, (9,))
    table = cos_sin_table(Cfg(), 10, 64)
    inv = 1 / 10000 ** (torch.arange(0, 10, 2).float() / 10)
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    gq, gk = get_op("rope").native(q, k, pos, table)
    torch.testing.assert_close(gq, q * cos + rot(q) * sin)
    torch.testing.assert_close(gk, k * cos + rot(k) * sin)


def random_args(op: str, dtype):
    n, h, d, inter, vocab = 7, 40, 12, 52, 97
    if "attention" in op:  # 4 query heads over 2 KV heads, requests on shuffled blocks of 4, a window of 3
        q_lens, kv_lens = {"attention_prefill": ([7, 1, 13], [7, 9, 30])}.get(op, ([1, 1, 1], [5, 17, 33]))
        meta, num_blocks = random_step(q_lens, kv_lens)
        kc, vc = torch.randn(2, num_blocks + 1, 4, 2, d, dtype=dtype)
        if op == "rope_decode_attention":  # raw q, k, v: strided views of one packed QKV row per request
            q, k, v = torch.randn(3, 8 * d, dtype=dtype).split((4 * d, 2 * d, 2 * d), -1)
            norms = ((torch.randn(d) * 0.2 + 1).to(dtype), (torch.randn(d) * 0.2 + 1).to(dtype))
            return (q.view(3, 4, d), k.view(3, 2, d), v.view(3, 2, d), *norms, 1e-6, meta.positions,
                    torch.randn(64, d), kc, vc, meta, d ** -0.5, 3)
        return torch.randn(sum(q_lens), 4, d, dtype=dtype), kc, vc, meta, d ** -0.5, 3
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    w = lambda *s: (torch.randn(*s) * 0.2).to(dtype)  # noqa: E731
    cos_sin = torch.randn(64, d)
    kc, vc = torch.zeros(8, 4, 2, d, dtype=dtype), torch.zeros(8, 4, 2, d, dtype=dtype)
    slots = torch.randperm(32)[:n]
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5, 2.0, 1.0])
    sampling = (temp, torch.tensor([-1, 5, 0, 3, 1, -1, 10]), torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.3, 0.8]),
                torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.05, 0.0]), torch.empty(n, vocab).exponential_())
    return {
        "rms_norm": (r(n, h), w(h) + 1, 1e-6),
        "add_rms_norm": (r(n, h), r(n, h), w(h) + 1, 1e-6),
        "rope": (r(n, 3, d), r(n, 1, d), torch.randint(0, 64, (n,)), cos_sin),
        "silu_and_mul": (r(n, 2 * inter),),
        "linear": (r(n, h), w(inter, h), w(inter)),
        "embedding": (torch.randint(0, vocab, (n,)), w(vocab, h), torch.tensor(h ** 0.5)),
        "store_kv": (r(n, 2, d), r(n, 2, d), kc, vc, slots),
        "sample": (r(n, vocab), *sampling),
        "norm_qkv": (r(n, h), w(h) + 1, w(3 * h, h), None, 1e-6),
        "qk_norm_rope": (r(n, 4, d), r(n, 2, d), r(n, 2, d), w(d) + 1, w(d) + 1, 1e-6, torch.randint(0, 64, (n,)),
                         cos_sin, kc, vc, slots),
        "attn_out": (r(n, h), w(h, h), r(n, h), w(h) + 1, 1e-6),
        "mlp": (r(n, h), w(2 * inter, h), w(h, inter), r(n, h)),
        "lm_head_sample": (r(n, h), w(h) + 1, 1e-6, w(vocab, h), *sampling),
        "gelu_tanh_and_mul": (r(n, 2 * inter),),
        "gelu_mlp": (r(n, h), w(2 * inter, h), w(h, inter), r(n, h)),
        "post_norm_attn_out": (r(n, h), w(h, h), r(n, h), w(h) + 1, w(h) + 1, 1e-6),
        "post_norm_residual": (r(n, h), w(h) + 1, r(n, h), 1e-6),
        "topk_route": (r(n, 8), 2, True),
        "moe": (r(n, h), w(8, 2 * inter, h), w(8, h, inter), torch.rand(n, 2, dtype=dtype),
                torch.randint(0, 8, (n, 2))),
        "moe_mlp": (r(n, h), w(8, h), w(8, 2 * inter, h), w(8, h, inter), r(n, h), 2, True),
    }[op]


SHAPES = dict(hidden=40, head_dim=12, heads=4, kv_heads=2)  # the widths random_args draws


# The verify step's integer bookkeeping (ops/verify_ops.py), on inputs that must agree with each other: its
# Triton kernels are tested against the natives in test_triton_kernels; its compile backend is the wrapper every
# op's is, and would cost CI ten seconds a compile.
BOOKKEEPING = ("verify_layout", "verify_accept", "ngram_lookup")


def cpu_backends() -> list[tuple[str, str]]:
    """(op, backend) for every registered backend but the native that runs on this process's CPU in float32.
    Compiling attention takes minutes on a CPU: test_compiled_attention_matches_native compiles the two
    attention ops once each, test_compiled_decode_layer_matches_native the whole layer."""
    load_plugins()
    return [(op, backend) for op in sorted(OPS) if op != "decode_layer" and op not in BOOKKEEPING
            for backend, impl in sorted(OPS[op].impls.items())
            if backend != "eager" and not (backend == "compile" and "attention" in op)
            and impl.support.reason_unsupported("cpu", torch.float32, SHAPES) is None]


def implementation(op: str, backend: str):
    parts = {p: native_site(p) for p in get_op(op).parts}
    fn, used = resolve(op, backend, Target("cpu", torch.float32, SHAPES), allow_fallback=False, parts=parts)
    assert used == backend
    return fn


@pytest.mark.parametrize("op,backend", cpu_backends())
def test_backend_matches_native(op, backend):
    torch.manual_seed(hash(op) % 1000)
    args = random_args(op, torch.float32)
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
    expected = native_site(op)(*[clone(a) for a in args])
    got_args = [clone(a) for a in args]
    got = implementation(op, backend)(*got_args)
    if op == "store_kv":  # compare the caches it wrote
        expected, got = args[2].clone(), got_args[2]
        native_site(op)(*args)
        expected = args[2]
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_sites_compose_their_parts():
    """A site resolved natively must call the parts it was given (so fused and unfused runs share code)."""
    calls = []

    def spy_linear(x, w, b=None):
        calls.append("linear")
        return torch.nn.functional.linear(x, w, b)

    parts = {"linear": spy_linear, "silu_and_mul": get_op("silu_and_mul").native}
    fn, _ = resolve("mlp", "eager", Target("cpu", torch.float32), parts=parts)
    fn(*random_args("mlp", torch.float32))
    assert calls == ["linear", "linear"]
