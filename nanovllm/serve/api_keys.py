"""Where the server's API key comes from, so it is never written to disk.

Hydra records the command line's overrides and the composed config in the run directory's `.hydra/*.yaml`
before the app starts, so a key given as `server.api_key=...` would land there in plain text. It is refused
instead (`refuse_api_key_override`, checked before Hydra starts); the key comes from `$NANOVLLM_API_KEY`
(serve.yaml reads it through an `${oc.env:...}` interpolation, which Hydra records unresolved) or from the
file named by `server.api_key_file` / `$NANOVLLM_API_KEY_FILE`.
"""

from __future__ import annotations

import os
import re

# `server.api_key=x`, `+server.api_key=x`, `++server.api_key=x`; an interpolation (${oc.env:...}) names no secret
_OVERRIDE = re.compile(r"^\+{0,2}server\.api_key=(.*)$", re.DOTALL)


class APIKeyOverrideError(ValueError):
    pass


def refuse_api_key_override(argv: list[str]) -> None:
    """Raise APIKeyOverrideError if a command-line override sets `server.api_key` to a literal key."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match and match.group(1).strip() not in ("", "null") and not match.group(1).startswith("${"):
            raise APIKeyOverrideError(
                "server.api_key may not be given on the command line: Hydra would write it into the run "
                "directory's .hydra/*.yaml (and argv is visible in `ps`). Set the environment variable "
                "NANOVLLM_API_KEY, or put the key in a file and pass server.api_key_file=PATH "
                "(or NANOVLLM_API_KEY_FILE=PATH)")


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key the server checks: from `api_key_file` if given (its text, stripped), else `api_key`."""
    if api_key_file is None:
        return api_key
    if api_key is not None:
        raise ValueError("both server.api_key (or $NANOVLLM_API_KEY) and server.api_key_file are set; set one")
    path = os.path.expanduser(api_key_file)
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"server.api_key_file={api_key_file!r} cannot be read: {e.strerror}") from None
    if not key:
        raise ValueError(f"server.api_key_file={api_key_file!r} is empty")
    return key
