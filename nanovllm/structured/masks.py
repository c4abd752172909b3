"""The token masks of a step's constrained rows, applied to their logits (any device, any float dtype).

Each matcher fills one row of a packed bitmask on the host (bit j of word i allows token 32 i + j); the
packed rows go to the device in one copy and are unpacked there, and the disallowed logits of those rows
become -inf. Rows without a matcher are not touched. Host tensors bound for a GPU are pinned and copied without
blocking: a copy from pageable memory would make the host wait until the GPU has run everything queued before it
(the forward pass the masks are meant to overlap)."""

from __future__ import annotations

import torch


def apply_grammar_masks(logits: torch.Tensor, matchers: list) -> None:
    """Mask `logits` (rows x vocab) in place: row i keeps only the tokens matchers[i] allows (None: all)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    import xgrammar as xgr

    vocab = logits.shape[-1]
    packed = xgr.allocate_token_bitmask(len(rows), vocab)
    for k, i in enumerate(rows):
        matchers[i].fill_next_token_bitmask(packed, k)
    device = logits.device
    packed = to_device(packed, device)
    bits = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((packed.unsqueeze(-1) >> bits) & 1).view(len(rows), -1)[:, :vocab].bool()
    index = to_device(torch.tensor(rows), device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for it: pinned first when the device is a GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
