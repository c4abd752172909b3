"""config.json written so that transformers 4.x and 5 both read it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_config(config, dest: Path, dtype: torch.dtype) -> None:
    """config.json with the dtype and rope theta keys that transformers 4.x and 5 both read."""
    config.save_pretrained(dest)
    path = dest / "config.json"
    data = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    data["dtype"] = data["torch_dtype"] = name  # transformers 5 reads dtype, 4.x torch_dtype
    # transformers 5 keeps rope theta in rope_parameters; 4.x reads it at the top level.
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in data:
        data["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
