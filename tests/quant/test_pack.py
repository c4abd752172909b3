"""Packing quantized shards: widening int4 to int8 and to smaller groups keeps every decoded value; act-order
weights undo their permutation when dequantized into a dense parameter."""

from __future__ import annotations

import pytest
import torch

from nanovllm.quant.pack import dense_weight, pack_rows, packed_format, widen
from nanovllm.quant.rtn import quantize


def w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
def test_widen_int4_to_int8_keeps_values(symmetric):
    q = quantize(w(6, 70), "int4", 32, symmetric)
    wide = widen(q, "int8", 16, with_offset=True)
    assert wide.format == "int8" and wide.group_size == 16 and wide.offset is not None
    torch.testing.assert_close(wide.dequantize(torch.float32), q.dequantize(torch.float32))


def test_pack_rows_mixed_formats_and_groups():
    q, k, v = quantize(w(8, 64, seed=1), "int4", 32), quantize(w(4, 64, seed=2), "int4", 32), \
        quantize(w(4, 64, seed=3), "int8", 16)
    packed = pack_rows([q, k, v])
    assert packed.format == "int8" and packed.group_size == 16 and packed.shape == (16, 64)
    ref = torch.cat([p.dequantize(torch.float32) for p in (q, k, v)])
    torch.testing.assert_close(packed.dequantize(torch.float32), ref)


def test_pack_rows_same_format_is_cat_rows():
    parts = [quantize(w(4, 32, seed=i), "fp8") for i in range(2)]
    packed = pack_rows(parts)
    assert packed.format == "fp8" and packed.offset is None
    ref = torch.cat([p.dequantize(torch.float32) for p in parts])
    torch.testing.assert_close(packed.dequantize(torch.float32), ref)


def test_fp8_does_not_mix_with_ints():
    assert packed_format(["int4", "int8"]) == "int8"
    with pytest.raises(ValueError, match="cannot pack fp8 with"):
        packed_format(["fp8", "int4"])


def test_dense_weight_undoes_act_order():
    dense = w(5, 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    q = quantize(dense[:, perm], "int8")
    q.perm = perm
    x = w(3, 12, seed=4)
    torch.testing.assert_close(x @ dense_weight(q, torch.float32).T, q.linear(x))
