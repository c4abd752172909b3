"""build_metadata against a plain per-request reference: packed prefill/decode steps, steps padded to a graph's
batch size on the scratch block, writing into a staging buffer's views, and the errors for bad tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.ops.meta import build_metadata

BS = 4


def reference(tables, seq_lens, q_lens, rows=None, width=None, scratch=None):
    """One request at a time, padding requests last: each decodes position 0 of the scratch block."""
    rows = len(tables) if rows is None else rows
    reqs = [(list(t), s, q) for t, s, q in zip(tables, seq_lens, q_lens)]
    reqs += [([scratch], 1, 1)] * (rows - len(tables))
    width = max(len(t) for t, _, _ in reqs) if width is None else width
    max_q = max(q for _, _, q in reqs)
    out = dict(positions=[], slot_mapping=[], pad_index=[], seq_lens=[], cu_seqlens_q=[0], num_blocks=[],
               block_tables=[])
    for b, (table, seq_len, q) in enumerate(reqs):
        for i, p in enumerate(range(seq_len - q, seq_len)):
            out["positions"].append(p)
            out["slot_mapping"].append(table[p // BS] * BS + p % BS)
            out["pad_index"].append(b * max_q + i)
        out["seq_lens"].append(seq_len)
        out["cu_seqlens_q"].append(out["cu_seqlens_q"][-1] + q)
        out["num_blocks"].append(len(table))
        out["block_tables"].append(table + [0] * (width - len(table)))
    return out, max_q, max(s for _, s, _ in reqs)


def check(got, want):
    expected, max_q, max_k = want
    for name, values in expected.items():
        np.testing.assert_array_equal(getattr(got, name), np.array(values, dtype=np.int64), err_msg=name)
        assert getattr(got, name).dtype == np.int64, name
    assert (got.max_seqlen_q, got.max_seqlen_k) == (max_q, max_k)


def random_requests(rng, n):
    blocks = list(rng.permutation(64))
    seq_lens = [int(s) for s in rng.integers(1, 30, n)]
    tables = [[int(blocks.pop()) for _ in range(-(-s // BS) + int(rng.integers(0, 2)))] for s in seq_lens]
    q_lens = [int(rng.integers(1, s + 1)) for s in seq_lens]
    return tables, seq_lens, q_lens


@pytest.mark.parametrize("seed", range(4))
def test_packed_steps_match_the_reference(seed):
    tables, seq_lens, q_lens = random_requests(np.random.default_rng(seed), 5)
    check(build_metadata(tables, seq_lens, BS, q_lens=q_lens), reference(tables, seq_lens, q_lens))
    ones = [1] * len(tables)  # a decode step: one new token each, given or by default
    check(build_metadata(tables, seq_lens, BS, q_lens=ones), reference(tables, seq_lens, ones))
    check(build_metadata(tables, seq_lens, BS), reference(tables, seq_lens, ones))


@pytest.mark.parametrize("n", [0, 1, 3])
def test_padded_decode_step_into_staging_views(n):
    """As the decode graphs fill their pinned buffer: rows padded to 6 on scratch block 99, 10 columns."""
    tables, seq_lens, _ = random_requests(np.random.default_rng(n), n)
    rows, width = 6, 10
    buf = np.full(3 * rows + rows * width, -7, dtype=np.int64)  # stale values must all be overwritten
    out = dict(positions=buf[:rows], slot_mapping=buf[rows:2 * rows], seq_lens=buf[2 * rows:3 * rows],
               block_tables=buf[3 * rows:].reshape(rows, width))
    got = build_metadata(tables, seq_lens, BS, rows=rows, width=width, scratch_block=99, out=out)
    want = reference(tables, seq_lens, [1] * n, rows=rows, width=width, scratch=99)
    check(got, want)
    for name in ("positions", "slot_mapping", "seq_lens", "block_tables"):
        np.testing.assert_array_equal(out[name], np.array(want[0][name]), err_msg=name)
    assert got.block_tables.base is buf  # the plan hooks' table is the staging buffer's
    assert not np.shares_memory(got.seq_lens, buf)  # their seq_lens outlive the next refill


def test_device_metadata_and_array_rows():
    tables = np.array([[5, 2, 0], [7, 1, 3]])  # rows of an array, the first using two of its blocks
    step = build_metadata([tables[0, :2], tables[1]], [6, 11], BS, q_lens=[2, 3])
    meta = step.to_device(torch.device("cpu"), graph_batch=2)
    assert meta.slot_mapping.tolist() == [2 * BS + 0, 2 * BS + 1, 3 * BS + 0, 3 * BS + 1, 3 * BS + 2]
    assert meta.positions.tolist() == [4, 5, 8, 9, 10] and meta.pad_index.tolist() == [0, 1, 3, 4, 5]
    assert meta.cu_seqlens_q.tolist() == [0, 2, 5] and meta.seq_lens.tolist() == [6, 11]
    assert meta.block_tables.tolist() == [[5, 2, 0], [7, 1, 3]] and meta.graph_batch == 2
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (3, 11) and not meta.is_decode
    assert meta.host["num_blocks"].tolist() == [2, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(tables=[[1]], seq_lens=[5]), "1 blocks of 4 tokens cannot hold its 5 tokens"),
    (dict(tables=[[1, 2, 3]], seq_lens=[9], width=2), "3 blocks do not fit a 2-column block table"),
    (dict(tables=[[1]], seq_lens=[3], q_lens=[4]), "4 new tokens of 3"),
    (dict(tables=[[1]], seq_lens=[3], q_lens=[0]), "0 new tokens of 3"),
    (dict(tables=[[1]], seq_lens=[3], rows=2), "scratch_block"),
    (dict(tables=[[1], [2]], seq_lens=[3], rows=2), "2 block tables but 1 seq_lens"),
    (dict(tables=[[1], [2]], seq_lens=[3, 3], rows=1), "cannot pad 2 requests to 1 rows"),
])
def test_bad_steps_are_named(kwargs, match):
    tables, seq_lens = kwargs.pop("tables"), kwargs.pop("seq_lens")
    with pytest.raises(ValueError, match=match):
        build_metadata(tables, seq_lens, BS, **kwargs)
