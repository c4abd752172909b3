"""Package layout; everything else is declared in pyproject.toml.

`kernels/` and `configs/` sit at the repository root (beside `nanovllm/`) and ship inside the wheel as
`nanovllm.kernels` and `nanovllm.configs`; nanovllm/resources.py finds them either way. The package list is
computed here because pyproject.toml cannot both discover packages and add mapped ones.

Neither folder has an __init__.py, on purpose: with the checkout on PYTHONPATH, a regular package there would
be importable as top-level `kernels` / `configs` and shadow the PyPI packages of those names (transformers
imports `kernels`). Installed, they are namespace packages inside nanovllm.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

NO_CACHES = ["*__pycache__*"]
MAPPED = {"nanovllm.kernels": "kernels", "nanovllm.configs": "configs"}


def mapped_packages(package: str, folder: str) -> list[str]:
    """`package` and one package per subfolder holding Python files (data-only folders ship as its data)."""
    subs = find_namespace_packages(where=folder, exclude=NO_CACHES)
    return [package, *(f"{package}.{s}" for s in subs if any(Path(folder, *s.split(".")).glob("*.py")))]


setup(
    packages=[*find_namespace_packages(include=["nanovllm", "nanovllm.*"], exclude=NO_CACHES),
              *(p for package, folder in MAPPED.items() for p in mapped_packages(package, folder))],
    package_dir=MAPPED,
)
