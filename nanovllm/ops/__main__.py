"""python -m nanovllm.ops [--plugin-dir DIR ...]: print the registry, ops x backends with what each supports."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from nanovllm.ops import OPS, load_plugins


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanovllm.ops", description=__doc__)
    parser.add_argument("--plugin-dir", action="append", default=[], help="extra kernel plugin directory")
    args = parser.parse_args(argv)
    loaded = load_plugins(args.plugin_dir)
    table = Table(title="nano-vllm op registry")
    table.add_column("op")
    table.add_column("kind")
    table.add_column("backends: supports")
    for name in sorted(OPS, key=lambda n: (OPS[n].is_site, n)):
        op = OPS[name]
        backends = "\n".join(f"{b}: {impl.support.describe()}" for b, impl in sorted(op.impls.items()))
        kind = "site = " + " + ".join(op.parts) if op.is_site else "primitive"
        table.add_row(f"{name}\n[dim]{op.doc}[/dim]", kind, backends)
    console = Console()
    console.print(table)
    for path, error in loaded.items():
        console.print(f"plugin {path}: " + ("loaded" if error is None else f"[red]failed: {error}[/red]"))


if __name__ == "__main__":
    main()
