"""`python -m nanovllm.ops --resolved [overrides]`: which backend each op of a model gets, and why.

The overrides are those of `python -m nanovllm.run` (model=..., device=cuda, +kernels=..., kernels.ops.X=...).
The model is built on the meta device, so resolution runs exactly as at engine start-up (per layer, with each
family's ops and shapes) without reading weights or needing the device: `device=cuda` on a machine without a
GPU shows what a GPU would get.
"""

from __future__ import annotations

import textwrap

import torch

from nanovllm.ops.resolver import OpResolver, scopes_text


def compose(overrides=()):
    """The run config for these overrides, checked as `python -m nanovllm.run` checks it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nanovllm.config import check_kernel_names, check_schema, register_configs
    from nanovllm.resources import configs_dir

    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    check_schema(cfg)
    check_kernel_names(cfg.kernels)
    return cfg


def resolve_for(cfg) -> OpResolver:
    """The resolver of the model that `cfg` names, after building that model on the meta device."""
    from omegaconf import OmegaConf

    from nanovllm.checkpoints import resolve_model
    from nanovllm.config import DTYPES
    from nanovllm.models.loader import load_hf_config
    from nanovllm.models.registry import build_model, model_target

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device).type
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    from nanovllm.quant.source import weight_source

    path = resolve_model(cfg.model.name, revision=cfg.model.get("revision"))
    hf_config = load_hf_config(path)
    formats = weight_source(path, hf_config, cfg.engine).formats  # the quantized weights, as the engine has them
    resolver = OpResolver(OmegaConf.to_container(cfg.kernels, resolve=True), model_target(hf_config, device, dtype),
                          hf_config.num_hidden_layers, formats)
    with torch.device("meta"):
        build_model(hf_config, resolver)
    return resolver


def resolved_text(resolver: OpResolver, width: int = 80) -> str:
    """The summary line, then one line per op: its backend (per layer range where layers differ) and why."""
    per_op: dict[str, dict[str, list[str]]] = {}
    for scope, used in resolver.table.items():
        for op, backend in used.items():
            per_op.setdefault(op, {}).setdefault(backend, []).append(scope)
    lines = textwrap.wrap(resolver.summary(), width, subsequent_indent="    ")
    for op in sorted(per_op):
        backends = per_op[op]
        where = ", ".join(b if len(backends) == 1 else f"{b} ({scopes_text(s)})" for b, s in backends.items())
        lines += textwrap.wrap(f"{op}: {where}", width, initial_indent="  ", subsequent_indent="      ")
        if op in resolver.reasons:
            lines += textwrap.wrap(resolver.reasons[op], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
