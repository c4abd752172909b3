"""The op registry. Importing this package defines every built-in op (primitives and fusion sites)."""

# define the ops (family_ops imports the rest)
from nanovllm.ops import family_ops, primitives, sites, verify_ops  # noqa: F401
from nanovllm.ops.meta import AttentionMetadata, PlanContext
from nanovllm.ops.plugins import load_plugins
from nanovllm.ops.registry import (
    COMPILE,
    NATIVE,
    OPS,
    RegistryError,
    Target,
    define_op,
    get_op,
    native_site,
    register_impl,
    resolve,
)
from nanovllm.ops.resolver import MODEL_SCOPE, OpResolver

__all__ = [
    "AttentionMetadata", "COMPILE", "PlanContext", "MODEL_SCOPE", "NATIVE", "OPS", "OpResolver", "RegistryError",
    "Target",
    "define_op", "get_op", "load_plugins", "native_site", "register_impl", "resolve",
]
