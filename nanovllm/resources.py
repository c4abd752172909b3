"""Where the shipped kernel plugins (`kernels/`) and Hydra configs (`configs/`) are.

In a source checkout they sit beside the `nanovllm/` package (run through PYTHONPATH or an editable
install); an installed wheel carries them as the `nanovllm.kernels` and `nanovllm.configs` packages
(pyproject.toml maps the folders there). The checkout wins when both exist, so a tree run through
PYTHONPATH uses its own kernels and presets even where another copy of nano-vllm is installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the repository root when run from a checkout


def shipped_dir(name: str) -> Path:
    """The folder of `kernels` or `configs`: the source checkout's, else the installed package's."""
    source = SOURCE_ROOT / name
    if (SOURCE_ROOT / "pyproject.toml").is_file() and source.is_dir():
        return source
    spec = importlib.util.find_spec(f"nanovllm.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise FileNotFoundError(f"nano-vllm's {name}/ folder was found neither beside {Path(__file__).parent} "
                            f"(a source checkout) nor as the package nanovllm.{name} (an installed wheel); "
                            f"reinstall nano-vllm")


def kernels_dir() -> Path:
    return shipped_dir("kernels")


def configs_dir() -> Path:
    return shipped_dir("configs")


def hydra_config_path() -> str:
    """`config_path` for @hydra.main: the configs folder as an absolute path."""
    return str(configs_dir())
