"""The op registry: named ops with a native reference, and backend implementations registered against them.

An op's native function is its semantics, its fallback and its test oracle. A backend registers an
implementation for an op under a name and says what it supports. Resolution happens once, when the
model is built, per op and per layer; nothing is looked up inside the forward pass.

Fusion sites (`parts` non-empty) are ops whose native function composes primitive ops. Their native
takes the primitives as keyword arguments, so the unfused path ("eager" for a site) calls the
primitives exactly as they were resolved for that layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanovllm.quant.weights import FORMATS

log = logging.getLogger("nanovllm.ops")

NATIVE = "eager"
COMPILE = "compile"
AUTO = "auto"  # not an implementation: the resolver picks one per op (ops/auto.py)
DENSE = "dense"  # the weight format of unquantized weights (Support.formats)
# KV cache element types (EngineConfig.kv_cache_dtype): "auto" stores K/V in the model dtype, "fp8" as
# float8_e4m3fn with a scale per KV head. Ops that read or write the cache declare the ones they handle.
KV_DTYPES = ("auto", "fp8")


class RegistryError(ValueError):
    """A bad op or backend name, or a backend that cannot serve the request and may not fall back."""


@dataclass(frozen=True)
class Support:
    """What an implementation can run. `None` means any. `check(shapes)` returns a reason or None."""

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    check: Callable[[dict], str | None] | None = None
    needs: Callable[[], str | None] | None = None  # availability (an importable library, a GPU ...)
    formats: tuple[str, ...] = (DENSE,)  # the weight formats it reads: dense and/or nanovllm.quant.FORMATS
    kv_dtypes: tuple[str, ...] = KV_DTYPES  # the KV cache dtypes it handles (ops that touch no cache: all)

    def reason_unsupported(self, device: str, dtype: torch.dtype, shapes: dict,
                           weight_format: str | frozenset[str] = DENSE, kv_dtype: str = "auto") -> str | None:
        """Why it cannot serve this target, or None. `weight_format` is one format or the set a layer's
        weights come in (a layer may mix formats): every one of them must be read."""
        if self.needs is not None and (why := self.needs()):
            return why
        if missing := sorted(formats_of(weight_format) - set(self.formats)):
            return f"{'/'.join(missing)} weights not in {list(self.formats)}"
        if kv_dtype not in self.kv_dtypes:
            return f"{kv_dtype} KV cache not in {list(self.kv_dtypes)}"
        if self.devices is not None and device not in self.devices:
            return f"device {device!r} not in {list(self.devices)}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"dtype {dtype} not in {[str(d) for d in self.dtypes]}"
        if self.check is not None:
            return self.check(shapes)
        return None

    def describe(self) -> str:
        parts = []
        if self.devices is not None:
            parts.append("/".join(self.devices))
        if self.dtypes is not None:
            parts.append("/".join(str(d).removeprefix("torch.") for d in self.dtypes))
        if self.check is not None:
            parts.append((self.check.__doc__ or "shape limits").strip().splitlines()[0])
        return ", ".join(parts) or "any"


@dataclass
class Impl:
    op: str
    backend: str
    fn: Callable
    support: Support = field(default_factory=Support)
    # build(site_parts) -> callable; used by backends that wrap a composition (e.g. compile of a site)
    build: Callable[[dict[str, Callable]], Callable] | None = None
    # plan(meta, ctx): called once per step, outside any CUDA graph, before the forward pass; it may
    # store per-step state (e.g. a FlashInfer wrapper's plan) in meta.plans. See ops/meta.py.
    plan: Callable | None = None
    # layouts[arg]: converts the weight passed as `arg` into the layout this backend reads; the model applies
    # it once, after loading, to the layers that resolved to this backend (e.g. interleaved gate/up rows).
    layouts: dict[str, Callable] = field(default_factory=dict)
    # cold(target) -> why the first use would stop to compile for long (a JIT cache miss), or None. `auto`
    # passes over a cold backend; the hook may start that build in the background.
    cold: Callable[[Target], str | None] | None = None


@dataclass
class OpDef:
    name: str
    native: Callable
    doc: str
    parts: tuple[str, ...] = ()
    impls: dict[str, Impl] = field(default_factory=dict)
    reads_kv: bool = False  # it reads or writes the paged KV cache (itself or through a part)

    @property
    def is_site(self) -> bool:
        return bool(self.parts)


OPS: dict[str, OpDef] = {}


def define_op(name: str, parts: tuple[str, ...] = (), reads_kv: bool = False):
    """Declare an op by its native function; the native is registered as backend `eager`. reads_kv: the op
    touches the paged KV cache (a site does when one of its parts does); its native handles every KV dtype."""

    def deco(fn: Callable) -> Callable:
        if name in OPS:
            raise RegistryError(f"op {name!r} is defined twice")
        kv = any([reads_kv, *(get_op(p).reads_kv for p in parts)])  # get_op: each part must exist
        op = OpDef(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "", parts, reads_kv=kv)
        op.impls[NATIVE] = Impl(name, NATIVE, fn, Support(formats=(DENSE, *FORMATS)))  # the dense reference
        op.impls[COMPILE] = Impl(name, COMPILE, fn, Support(kv_dtypes=_default_kv_dtypes(op)),
                                 build=functools.partial(_compiled, op))
        OPS[name] = op
        return fn

    return deco


def _default_kv_dtypes(op: OpDef) -> tuple[str, ...]:
    """A backend of an op that touches the KV cache handles the model-dtype cache unless it says more."""
    return ("auto",) if op.reads_kv else KV_DTYPES


def register_impl(op: str, backend: str, *, devices=None, dtypes=None, check=None, needs=None,
                  build=None, plan=None, layouts=None, cold=None, formats=(DENSE,), kv_dtypes=None,
                  replace: bool = False):
    """Register `fn` as backend `backend` of `op` (decorator). Raises on unknown ops and on clashes.

    devices/dtypes: what it runs on; check(shapes) -> reason it cannot serve these model shapes, or None;
    needs() -> reason it is unavailable (a missing library), or None; formats: the weight formats it reads
    (DENSE and/or nanovllm.quant.FORMATS); kv_dtypes: the KV cache dtypes it handles (KV_DTYPES; default
    "auto" only for ops that touch the cache); plan, layouts, cold: see Impl.
    """

    def deco(fn: Callable) -> Callable:
        opdef = get_op(op)
        if backend in (NATIVE, COMPILE, AUTO):
            raise RegistryError(f"backend name {backend!r} is built in for every op ({op!r})")
        if backend in opdef.impls and not replace:
            raise RegistryError(f"backend {backend!r} of op {op!r} is registered twice")
        support = Support(tuple(devices) if devices else None, tuple(dtypes) if dtypes else None, check, needs,
                          tuple(formats), _kv_dtypes(opdef, kv_dtypes))
        opdef.impls[backend] = Impl(op, backend, fn, support, build, plan, dict(layouts or {}), cold)
        return fn

    return deco


def _kv_dtypes(opdef: OpDef, kv_dtypes) -> tuple[str, ...]:
    if kv_dtypes is None:
        return _default_kv_dtypes(opdef)
    unknown = sorted(set(kv_dtypes) - set(KV_DTYPES))
    if unknown:
        raise RegistryError(f"op {opdef.name!r}: unknown KV cache dtype(s) {unknown}; valid: {list(KV_DTYPES)}")
    return tuple(kv_dtypes)


def declare_kv_dtypes(op: str, backend: str, kv_dtypes) -> None:
    """Set the KV cache dtypes an already registered backend handles (for backends registered through a
    helper that does not pass them on)."""
    opdef = get_op(op)
    if backend not in opdef.impls:
        raise RegistryError(f"op {op!r} has no backend {backend!r}")
    impl = opdef.impls[backend]
    impl.support = dataclasses.replace(impl.support, kv_dtypes=_kv_dtypes(opdef, kv_dtypes))


_COMPILED: dict[str, Callable] = {}


def _compiled(op: OpDef, parts: dict[str, Callable]) -> Callable:
    """torch.compile of the native, one per op. Parts are passed as keyword arguments rather than bound
    in a partial, because dynamo caches by code object and every compiled partial shares one."""
    if op.name not in _COMPILED:
        _COMPILED[op.name] = torch.compile(op.native, dynamic=True)
    return functools.partial(_COMPILED[op.name], **parts) if parts else _COMPILED[op.name]


def get_op(name: str) -> OpDef:
    if name not in OPS:
        raise RegistryError(f"unknown op {name!r}; valid ops: {', '.join(sorted(OPS))}")
    return OPS[name]


def backends_of(name: str) -> list[str]:
    """The names a kernel table may give this op: its implementations and `auto`."""
    return sorted([*get_op(name).impls, AUTO])


def all_backends() -> list[str]:
    return sorted({AUTO, *(b for op in OPS.values() for b in op.impls)})


def check_backend(op: str, backend: str) -> None:
    if backend not in backends_of(op):
        raise RegistryError(
            f"unknown backend {backend!r} for op {op!r}; valid backends: {', '.join(backends_of(op))}")


def formats_of(weight_format: str | frozenset[str]) -> frozenset[str]:
    """A weight format or a set of them, as a set."""
    return frozenset((weight_format,)) if isinstance(weight_format, str) else frozenset(weight_format)


# ops that take a linear weight (dense or a QuantizedWeight) themselves; a site reads weights when a part does
WEIGHT_OPS = ("linear", "moe")


def reads_weights(op: str) -> bool:
    """Whether `op` (or any of its parts) reads a linear weight, so its backend must read the weights' format."""
    return op in WEIGHT_OPS or any(reads_weights(p) for p in get_op(op).parts)


@dataclass(frozen=True)
class Target:
    """What a resolution is for: the device type, the dtype, the layer's shapes, its weights' format (one
    format, or the frozenset of formats a layer's weights come in: GGUF Q4_K_M mixes int4 and int8) and the KV
    cache dtype (KV_DTYPES)."""

    device: str
    dtype: torch.dtype
    shapes: dict = field(default_factory=dict, hash=False, compare=False)
    weight_format: str | frozenset[str] = DENSE
    kv_dtype: str = "auto"

    @property
    def formats(self) -> frozenset[str]:
        return formats_of(self.weight_format)

    @property
    def quantized(self) -> bool:
        return self.formats != {DENSE}


def resolve(op: str, backend: str, target: Target, *, allow_fallback: bool = True,
            parts: dict[str, Callable] | None = None, where: str = "",
            on_fallback: Callable[[str], None] | None = None) -> tuple[Callable, str]:
    """Pick the callable for `op` on `backend` (an implementation's name: `auto` is the resolver's to
    choose). Returns (fn, backend actually used).

    For a fusion site, `parts` holds the resolved primitives of the same layer; the native site
    composes them. An unsupported backend falls back to the native, if allowed, and says so: through
    `on_fallback(message)` when given (the resolver reports each distinct fallback once), else a warning.
    """
    check_backend(op, backend)
    if backend == AUTO:
        raise RegistryError(f"op {op!r}: backend {AUTO!r} is chosen by the resolver (OpResolver), not resolve()")
    opdef = get_op(op)
    impl = opdef.impls[backend]
    why = impl.support.reason_unsupported(target.device, target.dtype, target.shapes, target.weight_format,
                                          target.kv_dtype)
    if why is not None:
        msg = f"op {op!r}: backend {backend!r} unsupported here ({why})"
        if not allow_fallback:
            raise RegistryError(where + msg + "; set kernels.allow_fallback=true to use the native op instead")
        msg += f"; falling back to {NATIVE!r}"
        on_fallback(msg) if on_fallback is not None else log.warning("%s%s", where, msg)
        impl, backend = opdef.impls[NATIVE], NATIVE
    if opdef.is_site:
        missing = [p for p in opdef.parts if parts is None or p not in parts]
        if missing:
            raise RegistryError(f"site {op!r} needs resolved parts {missing}")
        site_parts = {p: parts[p] for p in opdef.parts}
        if impl.build is not None:
            return impl.build(site_parts), backend
        if backend == NATIVE:
            return functools.partial(opdef.native, **site_parts), backend
    elif impl.build is not None:
        return impl.build({}), backend
    return impl.fn, backend


def native_site(op: str) -> Callable:
    """The fully native composition of a site (every part native): the test oracle."""
    opdef = get_op(op)
    parts = {p: native_site(p) if get_op(p).is_site else get_op(p).native for p in opdef.parts}
    return functools.partial(opdef.native, **parts) if opdef.is_site else opdef.native
