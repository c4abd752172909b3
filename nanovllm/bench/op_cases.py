"""Inputs for each op at a model's shapes, and the bytes each call must move at the least (every input
read once, every output written once; intermediates of a fused site are free). An op with no case here
(a new plugin op) is reported as skipped by op_bench, not guessed at."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from nanovllm.ops import AttentionMetadata
from nanovllm.ops.meta import build_metadata

ATTN_CONTEXTS = (128, 4096)  # decode: latency-bound short context, bandwidth-bound long context
PREFILL_LEN = 256            # prefill: new tokens per request


@dataclass(frozen=True)
class ModelShapes:
    """Qwen3-0.6B by default."""

    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 3072
    vocab: int = 151936
    eps: float = 1e-6
    max_positions: int = 8192
    block_size: int = 16

    @classmethod
    def from_hf(cls, c, block_size: int = 16) -> ModelShapes:
        heads = c.num_attention_heads
        return cls(c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, c.intermediate_size, c.vocab_size,
                   c.rms_norm_eps, min(c.max_position_embeddings, 8192), block_size)

    def target_shapes(self) -> dict:
        """What `Support.check` sees (the keys ModelRunner passes)."""
        return dict(hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                    intermediate=self.intermediate, vocab=self.vocab)


@dataclass
class Case:
    name: str                      # e.g. "linear[qkv]", "attention_decode[ctx4096]"
    args: tuple
    bytes: int
    meta: AttentionMetadata | None = None
    info: dict = field(default_factory=dict)


class _Make:
    def __init__(self, s: ModelShapes, device, dtype, seed: int = 0, contexts=ATTN_CONTEXTS):
        self.s, self.device, self.dtype, self.contexts = s, torch.device(device), dtype, tuple(contexts)
        self.es = torch.finfo(dtype).bits // 8
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def t(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale
        return x.to(dtype or self.dtype)

    def cos_sin(self) -> torch.Tensor:
        return self.t(self.s.max_positions, self.s.head_dim, dtype=torch.float32)

    def positions(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.s.max_positions, (n,), generator=self.gen, device=self.device)

    def cache(self, num_blocks: int):
        s = self.s
        return tuple(self.t(num_blocks, s.block_size, s.kv_heads, s.head_dim) for _ in range(2))

    def sampling(self, n: int) -> tuple:
        """Greedy rows (temperature 0, no noise): the batch-1 benchmark's path."""
        z = torch.zeros(n, device=self.device)
        return z, z.long() - 1, z + 1, z, None


def paged_meta(q_lens, kv_lens, block_size: int, device, graph_batch: int | None = None):
    """(meta, blocks used) for requests whose last `q_lens` tokens are new, as ModelRunner.prepare builds it."""
    bounds = np.cumsum([0] + [-(-kl // block_size) for kl in kv_lens])
    tables = [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    step = build_metadata(tables, kv_lens, block_size, q_lens=q_lens)
    return step.to_device(device, graph_batch=graph_batch), int(bounds[-1])


# ---- one builder per op: (make, batch) -> [Case] -------------------------------------------------------

def _rms_norm(m: _Make, n: int):
    h = m.s.hidden
    return [Case("rms_norm", (m.t(n, h), m.t(h), m.s.eps), (2 * n * h + h) * m.es)]


def _add_rms_norm(m: _Make, n: int):
    h = m.s.hidden
    return [Case("add_rms_norm", (m.t(n, h), m.t(n, h), m.t(h), m.s.eps), (4 * n * h + h) * m.es)]


def _rope(m: _Make, n: int):
    s = m.s
    q, k = m.t(n, s.heads, s.head_dim), m.t(n, s.kv_heads, s.head_dim)
    moved = 2 * (q.numel() + k.numel()) * m.es + n * s.head_dim * 4 + n * 8
    return [Case("rope", (q, k, m.positions(n), m.cos_sin()), moved)]


def _silu_and_mul(m: _Make, n: int):
    i = m.s.intermediate
    return [Case("silu_and_mul", (m.t(n, 2 * i),), 3 * n * i * m.es)]


def projections(s: ModelShapes) -> dict[str, tuple[int, int]]:
    """(out, in) of each weight matrix of a layer, and the LM head."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"qkv": (q + 2 * kv, s.hidden), "o_proj": (s.hidden, q), "gate_up": (2 * s.intermediate, s.hidden),
            "down": (s.hidden, s.intermediate), "lm_head": (s.vocab, s.hidden)}


def _linear(m: _Make, n: int):
    cases = []
    for name, (out, inp) in projections(m.s).items():
        w = m.t(out, inp, scale=0.02)
        cases.append(Case(f"linear[{name}]", (m.t(n, inp), w), (n * inp + out * inp + n * out) * m.es))
    return cases


def _store_kv(m: _Make, n: int):
    s = m.s
    blocks = -(-n // s.block_size) + 1
    k, v = m.t(n, s.kv_heads, s.head_dim), m.t(n, s.kv_heads, s.head_dim)
    slots = torch.arange(n, device=m.device)
    return [Case("store_kv", (k, v, *m.cache(blocks), slots), 4 * k.numel() * m.es + n * 8)]


def _attention(m: _Make, n: int, q_lens, kv_lens, name: str, graph_batch):
    s = m.s
    meta, blocks = paged_meta(q_lens, kv_lens, s.block_size, m.device, graph_batch)
    q = m.t(sum(q_lens), s.heads, s.head_dim)
    kv_read = 2 * sum(kv_lens) * s.kv_heads * s.head_dim * m.es
    moved = 2 * q.numel() * m.es + kv_read + meta.block_tables.numel() * 8
    args = (q, *m.cache(blocks + 1), meta, s.head_dim ** -0.5, 0, 0.0)
    return Case(name, args, moved, meta, dict(q_lens=q_lens[0], kv_len=kv_lens[0], seqs=len(q_lens)))


def _attention_decode(m: _Make, n: int):
    return [_attention(m, n, [1] * n, [ctx] * n, f"attention_decode[ctx{ctx}]", n) for ctx in m.contexts]


def _attention_prefill(m: _Make, n: int):
    return [_attention(m, n, [PREFILL_LEN] * n, [PREFILL_LEN] * n, f"attention_prefill[q{PREFILL_LEN}]", None)]


def _sample(m: _Make, n: int):
    return [Case("sample[greedy]", (m.t(n, m.s.vocab), *m.sampling(n)), n * m.s.vocab * m.es + n * 8)]


def _norm_qkv(m: _Make, n: int):
    (out, h) = projections(m.s)["qkv"]
    return [Case("norm_qkv", (m.t(n, h), m.t(h), m.t(out, h, scale=0.02), None, m.s.eps),
                 (n * h + h + out * h + n * out) * m.es)]


def _qk_norm_rope(m: _Make, n: int):
    s = m.s
    q, k, v = m.t(n, s.heads, s.head_dim), m.t(n, s.kv_heads, s.head_dim), m.t(n, s.kv_heads, s.head_dim)
    blocks = -(-n // s.block_size) + 1
    slots = torch.arange(n, device=m.device)
    args = (q, k, v, m.t(s.head_dim), m.t(s.head_dim), s.eps, m.positions(n), m.cos_sin(), *m.cache(blocks), slots)
    moved = (2 * q.numel() + 2 * k.numel() + 2 * v.numel() + 2 * s.head_dim) * m.es + n * (s.head_dim * 4 + 16)
    return [Case("qk_norm_rope", args, moved)]


def _attn_out(m: _Make, n: int):
    (h, q) = projections(m.s)["o_proj"]
    args = (m.t(n, q), m.t(h, q, scale=0.02), m.t(n, h), m.t(h), m.s.eps)
    return [Case("attn_out", args, (n * q + h * q + 3 * n * h + h) * m.es)]


def _mlp(m: _Make, n: int):
    s = m.s
    args = (m.t(n, s.hidden), m.t(2 * s.intermediate, s.hidden, scale=0.02), m.t(s.hidden, s.intermediate, scale=0.02),
            m.t(n, s.hidden))
    return [Case("mlp", args, (3 * n * s.hidden + 3 * s.intermediate * s.hidden) * m.es)]


def _lm_head_sample(m: _Make, n: int):
    s = m.s
    args = (m.t(n, s.hidden), m.t(s.hidden), s.eps, m.t(s.vocab, s.hidden, scale=0.02), *m.sampling(n))
    return [Case("lm_head_sample", args, (n * s.hidden + s.hidden + s.vocab * s.hidden) * m.es + n * 8)]


BUILDERS: dict[str, Callable[[_Make, int], list[Case]]] = {
    "rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rope": _rope, "silu_and_mul": _silu_and_mul,
    "linear": _linear, "store_kv": _store_kv, "attention_decode": _attention_decode,
    "attention_prefill": _attention_prefill, "sample": _sample, "norm_qkv": _norm_qkv,
    "qk_norm_rope": _qk_norm_rope, "attn_out": _attn_out, "mlp": _mlp, "lm_head_sample": _lm_head_sample,
}


def cases(op: str, shapes: ModelShapes, batch: int, device, dtype, contexts=ATTN_CONTEXTS,
          seed: int = 0) -> list[Case] | None:
    """The cases of `op` for `batch` rows (requests for attention, at each decode context), or None when
    the op has no builder."""
    builder = BUILDERS.get(op)
    return None if builder is None else builder(_Make(shapes, device, dtype, seed, contexts), batch)
