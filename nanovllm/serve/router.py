"""Which replica serves a request: the least outstanding work, with prefix affinity.

A request's affinity key is a hash of the start of its prompt (`prefix_chars` characters of the completion
prompt, or of the chat messages as JSON), so requests sharing a long prefix (a system prompt, a few-shot
preamble) map to one key. The router remembers which replica last served each key (its prefix cache holds
those blocks) and sends the key there again, unless that replica has more than `slack` requests outstanding
beyond the least busy healthy one; then the least busy one takes it (ties: the one routed to least so far)
and becomes the key's replica.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import xxhash

MAX_KEYS = 65536  # remembered prefixes; the least recently used are forgotten first


def affinity_key(body: bytes, prefix_chars: int) -> int | None:
    """A hash of the start of the prompt in a completion or chat request body; None if it has none."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    if "messages" in request:
        text = json.dumps(request["messages"], ensure_ascii=False, separators=(",", ":"))
    elif "prompt" in request:
        prompt = request["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts: its first one
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    else:
        return None
    return xxhash.xxh64_intdigest(text[:prefix_chars].encode("utf-8", "surrogatepass"))


class Router:
    def __init__(self, num_replicas: int, slack: int = 4):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.outstanding = [0] * num_replicas  # requests sent and not yet answered in full
        self.routed = [0] * num_replicas
        self.slack = slack
        self.owner: OrderedDict[int, int] = OrderedDict()  # affinity key -> the replica that last served it

    def choose(self, healthy: list[int], key: int | None) -> tuple[int, bool]:
        """(replica, whether it is the key's replica) among the `healthy` ones (non-empty)."""
        least = min(healthy, key=lambda i: (self.outstanding[i], self.routed[i], i))
        owner = self.owner.get(key) if key is not None else None
        hit = owner in healthy and self.outstanding[owner] <= self.outstanding[least] + self.slack
        chosen = owner if hit else least
        if key is not None:
            self.owner[key] = chosen
            self.owner.move_to_end(key)
            if len(self.owner) > MAX_KEYS:
                self.owner.popitem(last=False)
        return chosen, hit

    def started(self, replica: int) -> None:
        self.outstanding[replica] += 1
        self.routed[replica] += 1

    def finished(self, replica: int) -> None:
        self.outstanding[replica] -= 1
