"""Kernel presets -> composed run configs -> engines.

A preset is a file in configs/kernels/ applied with `+kernels=<name>`, exactly as `python -m nanovllm.run
+kernels=<name>` applies it, so the benchmark and `run` measure the same tables. `a+b` stacks presets
(`'+kernels=[a,b]'`). Extra Hydra overrides (model=tiny, device=cpu, engine.enforce_eager=true) apply to
every preset.
"""

from __future__ import annotations

import gc

import torch

from nanovllm.resources import configs_dir

CONFIGS = configs_dir()


def available() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "kernels").glob("*.yaml"))


def preset_overrides(preset: str) -> list[str]:
    names = [n for n in preset.split("+") if n]
    if not names:
        raise ValueError(f"empty preset name {preset!r}; available: {', '.join(available())}")
    return [f"+kernels={names[0]}"] if len(names) == 1 else [f"+kernels=[{','.join(names)}]"]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(defaults, user) -> list[str]:
    """`defaults` then `user`, where a user override replaces a default one for the same key (Hydra
    rejects two overrides of one key)."""
    keys = {override_key(o) for o in user}
    return [o for o in defaults if override_key(o) not in keys] + list(user)


class BadOverrides(ValueError):
    """Hydra could not compose the run config from these overrides; the message says why (and, for a
    `group=option` whose option has no YAML, which options there are)."""

    def __init__(self, overrides: list[str], error: Exception):
        hint = ""
        for o in overrides:
            key, _, value = o.partition("=")
            if key == "model" and not (CONFIGS / "model" / f"{value}.yaml").is_file():
                hint = (f"\n{o!r}: configs/model has no {value}.yaml; a catalog name, a folder or a hub id goes in "
                        f"model.name={value}")
        reason = str(error).split("\nConfig search path")[0].strip()  # the search path says nothing of the typo
        super().__init__(f"overrides {' '.join(overrides)}: {reason}{hint}")


def compose_config(preset: str, overrides=()):
    """The run config of `python -m nanovllm.run +kernels=<preset> <overrides>`, checked like `run` checks it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from nanovllm.config import check_kernel_names, check_schema, register_configs

    register_configs()
    overrides = [*preset_overrides(preset), *overrides]
    try:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as e:
        raise BadOverrides(overrides, e) from None
    check_schema(cfg)
    check_kernel_names(cfg.kernels)
    return cfg


def build_llm(cfg, min_model_len: int = 0):
    """An engine for a composed config; max_model_len is raised to `min_model_len` if it is smaller
    (the 4096-token latency prompt plus its new tokens must fit)."""
    from omegaconf import OmegaConf

    from nanovllm import LLM

    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    engine["max_model_len"] = max(engine["max_model_len"], min_model_len)
    return LLM(cfg.model.name, revision=cfg.model.revision, device=cfg.device, dtype=cfg.dtype,
               kernels=OmegaConf.to_container(cfg.kernels, resolve=True), **engine)


def release(llm) -> None:
    """Free an engine's weights, KV cache and graphs before the next one (or a peer) is built."""
    if llm is not None:
        llm.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
