"""The loop GPTQ and AWQ share: plain tensors pass through, each X.qweight with its siblings becomes X.weight."""

import pytest
import torch
from safetensors.torch import save_file

from nanovllm.quant.checkpoints.qweight_folder import repacked_tensors


def _folder(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_groups_siblings_and_passes_plain_tensors(tmp_path):
    z = torch.zeros(2, 2)
    path = _folder(tmp_path, {"a.qweight": z + 1, "a.scales": z + 2, "a.g_idx": z + 3, "norm.weight": z + 4})
    got = dict(repacked_tensors(path, "GPTQ", (".scales", ".g_idx", ".qzeros"), (".scales",),
                                lambda parts: sorted(parts)))
    assert got.keys() == {"a.weight", "norm.weight"}
    assert got["a.weight"] == [".g_idx", ".qweight", ".scales"]
    assert torch.equal(got["norm.weight"], z + 4)


def test_names_missing_required_siblings(tmp_path):
    path = _folder(tmp_path, {"a.qweight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"AWQ checkpoint .* lacks a\.qzeros, a\.scales"):
        list(repacked_tensors(path, "AWQ", (".qzeros", ".scales"), (".qzeros", ".scales"), dict))
