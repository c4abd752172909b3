"""Plugin discovery: every .py file under kernels/ (and extra directories) registers implementations.

`kernels/` is a plugin directory: files are imported by path under private module names, so a
researcher's kernel file can live anywhere and be named in `kernels.plugin_dirs`. The built-in one is
the source checkout's `kernels/` or, installed, the `nanovllm.kernels` package folder (nanovllm/resources.py).
Files whose name starts with `_` are shared helpers, not plugins: a plugin imports them with `load_sibling`
(beside it) or `load_builtin` (the built-in ones, e.g. kernels/triton/_gemv_core.py, from a plugin anywhere).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from nanovllm.resources import kernels_dir

log = logging.getLogger("nanovllm.ops")

BUILTIN_DIR = kernels_dir()
_loaded: dict[Path, str | None] = {}  # file -> error message, None when it loaded
_modules: dict[Path, object] = {}  # file -> its module, for the plugins that loaded


def load_plugins(extra_dirs=()) -> dict[Path, str | None]:
    """Import each plugin file once. A file that fails to import is reported, the rest still load."""
    dirs = [BUILTIN_DIR, *(Path(d).expanduser().resolve() for d in extra_dirs)]
    for d in dirs:
        if not d.is_dir():
            if d != BUILTIN_DIR:
                raise FileNotFoundError(f"kernel plugin directory {str(d)!r} does not exist")
            continue
        for path in sorted(d.rglob("*.py")):
            if path in _loaded or path.name.startswith("_"):
                continue
            name = "nanovllm_plugins." + "_".join(path.relative_to(d).with_suffix("").parts) + f"_{len(_loaded)}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            _loaded[path] = "still loading"  # a plugin importing plugins (load_builtin) does not re-enter it
            try:
                spec.loader.exec_module(module)
                _loaded[path] = None
                _modules[path] = module
            except Exception as e:  # a broken plugin must not take the others down
                _loaded[path] = f"{type(e).__name__}: {e}"
                log.warning("kernel plugin %s failed to load: %s", path, _loaded[path])
    return dict(_loaded)


def load_sibling(plugin_file: str, name: str):
    """Import a shared helper file (`_name.py`, skipped by discovery) beside a plugin file, once per process.

    Plugins are imported by path, not as package modules, so they cannot use relative imports; this gives
    helpers a stable module name per directory instead."""
    return _import_helper(Path(plugin_file).resolve().with_name(f"{name}.py"))


def load_builtin(name: str):
    """The module of a built-in kernel file, named by its path under kernels/ without `.py`, from a plugin
    anywhere (e.g. experiments/kernels/): `load_builtin("triton/_gemv_core")`.

    A helper (`_name`) is the very module its built-in siblings get from `load_sibling`, so its state (tuning
    tables, torch ops) is shared; a plugin file is the module `load_plugins` imported (loaded first if needed)."""
    path = BUILTIN_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no built-in kernel file {name!r} (looked for {path})")
    if path.name.startswith("_"):
        return _import_helper(path)
    load_plugins()
    if path not in _modules:
        raise ImportError(f"built-in kernel plugin {name!r} failed to load: {_loaded.get(path)}")
    return _modules[path]


def _import_helper(path: Path):
    """Import helper file `path` as nanovllm_plugins.<its directory>.<its name>, once per process."""
    mod_name = f"nanovllm_plugins.{path.parent.name}.{path.stem}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        sys.modules[mod_name] = module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise
    return sys.modules[mod_name]
