"""Helpers shared by every test area: the repository's root, the tiny Qwen3 shape and how its checkpoints are
drawn, and the environment a test gives the project's entry points when it runs them in a subprocess."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, max_position_embeddings=1024)


def randomize_constants(model, norm_center: float = 1.0):
    """Draw the parameters HF initializes to constants at random too (norms around `norm_center`, biases,
    MoE routers scaled up), so a swapped or skipped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(norm_center + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save_with_tokenizer(model, dest, tokenizer_dir):
    """An HF folder: the model's weights and config, plus the tokenizer files of `tokenizer_dir`."""
    model.save_pretrained(dest)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m nanovllm...` in a child process: this checkout first on PYTHONPATH (so the
    child runs the code under test, whatever is installed), no progress bars, Hydra's full tracebacks."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, NANOVLLM_PROGRESS="0", HYDRA_FULL_ERROR="1", **extra)
