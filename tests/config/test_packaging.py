"""The wheel carries the kernels, presets and tuned tables; the shipped folders are found installed or not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nanovllm import resources
from tests.helpers import ROOT

SOURCES = ("nanovllm", "kernels", "configs", "pyproject.toml", "setup.py", "README.md")


def test_wheel_holds_kernels_configs_and_console_scripts(tmp_path):
    """Built from a copy of the tree, so the build writes nothing into the checkout."""
    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("nano_vllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def shipped(folder: str, pattern: str) -> set[str]:
        return {f"nanovllm/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).glob(pattern)}

    for folder, pattern in (("kernels", "triton/*.py"), ("kernels", "flashinfer/*.py"), ("kernels", "torch/*.py"),
                            ("kernels", "triton/tuned/*.json"), ("configs", "*.yaml"), ("configs", "*/*.yaml"),
                            ("configs", "hydra/launcher/*.yaml")):
        expected = shipped(folder, pattern)
        assert expected and expected <= names, (folder, pattern, sorted(expected - names))
    assert "nanovllm/assets/qwen3_chat_template.jinja" in names
    assert not any(n.startswith(("kernels/", "configs/")) for n in names)  # no top-level `kernels` package
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("nanovllm = nanovllm.cli:main", "nanovllm-run = ", "nanovllm-serve = ", "nanovllm-bench = "):
        assert script in scripts


def test_shipped_folders_do_not_shadow_pypi_packages():
    """With the checkout on PYTHONPATH, an __init__.py would make these top-level `kernels` / `configs`
    packages, hiding the PyPI packages of those names."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "configs" / "__init__.py").exists()


def test_source_checkout_folders_are_found():
    assert resources.kernels_dir() == ROOT / "kernels"
    assert resources.configs_dir() == ROOT / "configs"
    assert Path(resources.hydra_config_path()) == ROOT / "configs"


def test_installed_package_folders_are_found(tmp_path, monkeypatch):
    """Without a checkout around the package, the folder of the installed nanovllm.<name> package is used."""
    import importlib.util
    from importlib.machinery import ModuleSpec

    installed = tmp_path / "site-packages" / "nanovllm" / "kernels"
    installed.mkdir(parents=True)
    spec = ModuleSpec("nanovllm.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(installed)]
    monkeypatch.setattr(resources, "SOURCE_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "nanovllm.kernels" else None)
    assert resources.kernels_dir() == installed
    with pytest.raises(FileNotFoundError, match="configs/ folder was found neither .* reinstall nano-vllm"):
        resources.configs_dir()
