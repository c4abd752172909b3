"""python -m nanovllm.ops [--plugin-dir DIR ...]: print the registry, one line per (op, backend), and the presets.
python -m nanovllm.ops --resolved [overrides]: the backend each op of a model gets, and why (ops/resolved.py).

Plain text wrapped to the terminal's width (80 columns when not a terminal), so it reads in a narrow
terminal, in a log and through `grep`.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import textwrap

from nanovllm.ops import COMPILE, NATIVE, OPS, load_plugins
from nanovllm.ops.registry import Impl, OpDef

BACKEND_WIDTH = 20  # backend names up to this long keep their support string on the same line
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def support_line(impl: Impl) -> str:
    """What a backend runs on, shortly: "cuda; bf16/fp16; hidden <= 65536"; "any" when unrestricted."""
    support = impl.support
    parts = []
    if support.devices is not None:
        parts.append("/".join(support.devices))
    if support.dtypes is not None:
        names = (str(d).removeprefix("torch.") for d in support.dtypes)
        parts.append("/".join(SHORT_DTYPES.get(n, n) for n in names))
    if support.check is not None:
        parts.append((support.check.__doc__ or "shape limits").strip().splitlines()[0])
    return "; ".join(parts) or "any"


def summary(op: OpDef) -> str:
    """The first paragraph of the native's docstring, on one line."""
    doc = inspect.getdoc(op.native) or op.doc
    return " ".join(doc.split("\n\n")[0].split())


def op_lines(op: OpDef, width: int) -> list[str]:
    """The op's header line, its one-line doc, then one line per registered backend."""
    head = f"{op.name}: site = {' + '.join(op.parts)}" if op.is_site else op.name
    lines = textwrap.wrap(head, width, subsequent_indent=" " * (len(op.name) + 9))
    if doc := summary(op):
        lines += textwrap.wrap(doc, width, initial_indent="    ", subsequent_indent="    ")
    for backend, impl in sorted(op.impls.items()):
        if backend in (NATIVE, COMPILE):  # every op has both; the header says so once
            continue
        lead = f"  - {backend:<{BACKEND_WIDTH}} "
        lines += textwrap.wrap(support_line(impl), width, initial_indent=lead,
                               subsequent_indent=" " * len(lead), break_on_hyphens=False)
    return lines


def registry_text(width: int) -> str:
    primitives = sorted(name for name, op in OPS.items() if not op.is_site)
    sites = sorted(name for name, op in OPS.items() if op.is_site)
    lines = [f"nano-vllm op registry: {len(primitives)} primitives, {len(sites)} fusion sites"]
    lines += textwrap.wrap(f"Every op also has `{NATIVE}` (its native PyTorch reference) and `{COMPILE}` "
                           "(torch.compile of the native); other backends below, with what each supports.", width)
    for title, names in (("primitives", primitives), ("fusion sites (native = the parts in a row)", sites)):
        lines += ["", f"{title}:"]
        for name in names:
            lines += op_lines(OPS[name], width)
    return "\n".join(lines)


def presets_text(width: int) -> str:
    """The kernel presets (configs/kernels/*.yaml) with the first line of each one's own description."""
    from nanovllm.resources import configs_dir

    lines = ["", "presets (+kernels=NAME; stack with '+kernels=[a,b]'):"]
    for path in sorted((configs_dir() / "kernels").glob("*.yaml")):
        comments = [line[1:].strip() for line in path.read_text().splitlines()
                    if line.startswith("#") and not line.startswith("# @package")]
        lead = f"  - {path.stem:<{BACKEND_WIDTH}} "
        lines += textwrap.wrap(comments[0] if comments else "", width, initial_indent=lead,
                               subsequent_indent=" " * len(lead)) or [lead.rstrip()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanovllm.ops", description=__doc__.splitlines()[0])
    parser.add_argument("--plugin-dir", action="append", default=[], help="extra kernel plugin directory")
    parser.add_argument("--resolved", action="store_true", help="which backend each op of a model gets, and why")
    parser.add_argument("overrides", nargs="*", help="with --resolved: run overrides, e.g. model=tiny device=cuda")
    args = parser.parse_args(argv)
    width = max(40, shutil.get_terminal_size((80, 24)).columns)
    if args.overrides and not args.resolved:
        parser.error("overrides go with --resolved")
    if args.resolved:
        from nanovllm.ops.resolved import compose, resolve_for, resolved_text

        dirs = [f"kernels.plugin_dirs=[{','.join(args.plugin_dir)}]"] if args.plugin_dir else []
        print(resolved_text(resolve_for(compose([*dirs, *args.overrides])), width))
        return
    loaded = load_plugins(args.plugin_dir)
    print(registry_text(width))
    print(presets_text(width))
    failed = {path: error for path, error in loaded.items() if error is not None}
    print(f"\nplugin files: {len(loaded) - len(failed)} loaded, {len(failed)} failed")
    for path, error in failed.items():
        print("\n".join(textwrap.wrap(f"failed: {path}: {error}", width, subsequent_indent="    ")))


if __name__ == "__main__":
    main()
