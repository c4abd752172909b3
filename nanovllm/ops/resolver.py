"""Resolves the kernel table of a config into callables, once per layer, and records what was used."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from types import SimpleNamespace

from nanovllm.ops.auto import choose
from nanovllm.ops.plugins import load_plugins
from nanovllm.ops.registry import (
    AUTO,
    DENSE,
    NATIVE,
    OPS,
    RegistryError,
    Target,
    all_backends,
    check_backend,
    get_op,
    reads_weights,
    resolve,
)

log = logging.getLogger("nanovllm.ops")

MODEL_SCOPE = "model"  # ops outside the decoder layers: final norm, LM head, sampling


class OpResolver:
    """Backend for (layer, op) = layers[layer][op], else ops[op], else `default` where the op has it;
    `auto` picks the fastest backend that serves the target (ops/auto.py), once per op.

    kernels: a mapping with keys default, ops, layers, plugin_dirs, allow_fallback (see config.py).
    `table[scope][op]` is the backend each op got; `reasons[op]` says why, where `auto` chose it or a
    backend fell back; each distinct fallback is logged once, not once per layer.

    weight_formats: the format of each quantized linear weight, by the model's parameter name
    ("layers.3.qkv_proj", "lm_head"); weights not named are dense. A scope's weight-reading ops resolve for
    the set of formats its weights come in (`scope(..., weights=...)`), the other ops for dense weights.
    """

    def __init__(self, kernels: Mapping, target: Target, num_layers: int,
                 weight_formats: Mapping[str, str] | None = None):
        load_plugins(kernels.get("plugin_dirs") or ())
        self.target, self.num_layers = target, num_layers
        self.weight_formats = dict(weight_formats or {})
        self.scope_formats: dict[str, frozenset[str]] = {}  # scope -> its weights' formats, as resolved
        self.default = kernels.get("default") or NATIVE
        self.ops = dict(kernels.get("ops") or {})
        self.layers = {str(k): dict(v or {}) for k, v in (kernels.get("layers") or {}).items()}
        self.groups = {name: parse_layers(spec, num_layers, name)
                       for name, spec in (kernels.get("groups") or {}).items()}
        self.allow_fallback = bool(kernels.get("allow_fallback", True))
        self.table: dict[str, dict[str, str]] = {}
        self.reasons: dict[str, str] = {}
        self._auto: dict[tuple, str] = {}  # (op, weight formats) -> the backend auto chose
        self._fallbacks: set[str] = set()
        self._validate()

    @property
    def plans(self) -> list:
        """The per-step plan hooks of every implementation in use, each once."""
        hooks = {}
        for used in self.table.values():
            for op, backend in used.items():
                hook = get_op(op).impls[backend].plan
                if hook is not None:
                    hooks[(op, backend)] = hook
        return list(dict.fromkeys(hooks.values()))

    def _validate(self) -> None:
        validate_kernel_table(dict(default=self.default, ops=self.ops, layers=self.layers, groups=self.groups),
                              self.num_layers)

    def backend_for(self, scope: str, op: str) -> str:
        if op in self.layers.get(scope, {}):
            return self.layers[scope][op]
        for name, members in self.groups.items():  # the first group naming this layer and op
            if scope.isdigit() and int(scope) in members and op in self.layers.get(name, {}):
                return self.layers[name][op]
        if op in self.ops:
            return self.ops[op]
        return self.default if self.default in get_op(op).impls or self.default == AUTO else NATIVE

    def weight_format(self, name: str) -> str:
        """The format of the model parameter `name` ("layers.3.qkv_proj", "lm_head"): dense unless quantized."""
        return self.weight_formats.get(name, DENSE)

    def target_for(self, scope: str, op: str) -> Target:
        """The target `op` resolves for in `scope`: the scope's weight formats where the op reads weights."""
        formats = self.scope_formats.get(scope, frozenset((DENSE,)))
        if formats == {DENSE} or not reads_weights(op):
            return self.target
        return replace(self.target, weight_format=formats)

    def pick(self, scope: str, op: str) -> str:
        """The backend named for (scope, op), with `auto` replaced by its choice (made once per op and set of
        weight formats)."""
        backend = self.backend_for(scope, op)
        if backend != AUTO:
            return backend
        target = self.target_for(scope, op)
        key = (op, target.formats)
        if key not in self._auto:
            self._auto[key], passed = choose(op, target)
            if passed:
                self.reasons[op] = "auto passed over " + "; ".join(passed)
        return self._auto[key]

    def _fallback(self, op: str, message: str) -> None:
        self.reasons[op] = message
        if message not in self._fallbacks:
            self._fallbacks.add(message)
            log.warning("%s", message)

    def summary(self) -> str:
        """One line: the backends the ops got, with the reasons for any backend that was not the one asked for
        (`auto` passing over a faster one, a fallback)."""
        by_backend: dict[str, set[str]] = {}
        for used in self.table.values():
            for op, backend in used.items():
                by_backend.setdefault(backend, set()).add(op)
        parts = []
        for backend, ops in sorted(by_backend.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            notes = "; ".join(f"{op}: {self.reasons[op]}" for op in sorted(ops) if op in self.reasons)
            count = f"{len(ops)} op" + "s" * (len(ops) > 1)
            parts.append(f"{backend} for {count}" + (f" ({notes})" if notes else ""))
        where = f"{self.target.device}, {str(self.target.dtype).removeprefix('torch.')}"
        quantized = self.formats_text()
        return (f"kernels ({where}, default {self.default}{'; ' + quantized if quantized else ''}): "
                + ", ".join(parts))

    def formats_text(self) -> str:
        """The quantized scopes by their weights' formats: "int4 weights in layers 1-26", "" when all dense."""
        by_formats: dict[frozenset, list[str]] = {}
        for scope, formats in self.scope_formats.items():
            if formats != {DENSE}:
                by_formats.setdefault(formats, []).append(scope)
        return "; ".join(f"{'+'.join(sorted(formats))} weights in {scopes_text(scopes)}"
                         for formats, scopes in sorted(by_formats.items(), key=lambda kv: sorted(kv[0])))

    def scope(self, scope: int | str, names: tuple[str, ...] | None = None,
              weights: tuple[str, ...] = ()) -> SimpleNamespace:
        """Resolved callables for one layer (or MODEL_SCOPE), each site built from that scope's parts.
        `weights`: the parameter names of the linear weights the scope's ops read (a layer's "qkv_proj" ...,
        the model's "lm_head"), whose formats (`weight_formats`) the weight-reading ops resolve for."""
        scope = str(scope)
        names = names or tuple(OPS)
        prefix = f"layers.{scope}." if scope.isdigit() else ""
        self.scope_formats[scope] = frozenset(self.weight_format(prefix + w) for w in weights) or frozenset((DENSE,))
        done: dict = {}
        used = self.table.setdefault(scope, {})
        for op in _sites_last(list(names)):
            parts = {p: done[p] for p in get_op(op).parts}
            where = f"layer {scope}: " if scope != MODEL_SCOPE else ""
            done[op], used[op] = resolve(op, self.pick(scope, op), self.target_for(scope, op),
                                         allow_fallback=self.allow_fallback, parts=parts, where=where,
                                         on_fallback=lambda m, op=op: self._fallback(op, m))
        return SimpleNamespace(**{n: done[n] for n in names})


def validate_kernel_table(kernels: Mapping, num_layers: int | None = None) -> None:
    """Fail on an unknown op, backend or layer key, with an error that lists the valid names. Layer indices
    are checked against `num_layers` when it is known (at model construction), else only for their form
    (when a config is composed, before the model is read). Plugins must be loaded first."""
    default = kernels.get("default") or NATIVE
    if default not in all_backends():
        raise RegistryError(f"unknown kernels.default backend {default!r}; valid backends: {', '.join(all_backends())}")
    for op, backend in (kernels.get("ops") or {}).items():
        check_backend(op, backend)
    groups = kernels.get("groups") or {}
    for name in groups:
        if str(name).isdigit() or name == MODEL_SCOPE:
            raise RegistryError(f"kernels.groups name {name!r} is taken by a layer key; use a word")
    indices = "layer indices" if num_layers is None else f"0..{num_layers - 1}"
    for layer, table in (kernels.get("layers") or {}).items():
        layer = str(layer)
        index_ok = layer.isdigit() and (num_layers is None or int(layer) < num_layers)
        if not (index_ok or layer == MODEL_SCOPE or layer in groups):
            raise RegistryError(f"kernels.layers has key {layer!r}; valid keys: {indices}, {MODEL_SCOPE!r} and the "
                                f"names in kernels.groups ({', '.join(groups) or 'none'})")
        for op, backend in (table or {}).items():
            check_backend(op, backend)


def parse_layers(spec, num_layers: int, name: str = "", key: str = "kernels.groups") -> frozenset[int]:
    """Layer indices of a group spec: "0-13", "0,2,5-7", "first,last", "first-3" (or a list of ints).
    `key` names the setting in errors (kernels.groups by default)."""
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    ends = {"first": 0, "last": num_layers - 1}
    out: set[int] = set()
    where = f"{key}.{name}" if name else key
    try:
        for part in parts:
            lo, _, hi = str(part).strip().partition("-")
            lo, hi = ends.get(lo.strip(), lo), ends.get(hi.strip(), hi)
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise RegistryError(f"{where}={spec!r}: write layer indices and ranges, e.g. '0-13,20' or 'first,last'") \
            from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad or not out:
        raise RegistryError(f"{where}={spec!r}: layers {bad or 'none'} outside 0..{num_layers - 1}")
    return frozenset(out)


def scopes_text(scopes) -> str:
    """["0", "1", "2", "5", "model"] -> "layers 0-2, 5, model"."""
    nums = sorted(int(s) for s in scopes if str(s).isdigit())
    runs, start = [], None
    for i, n in enumerate(nums):
        start = n if start is None else start
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            runs.append(f"{start}-{n}" if n > start else str(n))
            start = None
    named = [str(s) for s in scopes if not str(s).isdigit()]
    return ", ".join((["layers " + ", ".join(runs)] if runs else []) + named)


def _sites_last(names: list[str]) -> list[str]:
    """Order so that each op comes after its parts (sites may be built from other sites)."""
    out: list[str] = []

    def visit(n: str, stack: tuple = ()):
        if n in out:
            return
        if n in stack:
            raise RegistryError(f"op {n!r} is part of itself")
        for p in get_op(n).parts:
            visit(p, stack + (n,))
        out.append(n)

    for n in names:
        visit(n)
    return out
