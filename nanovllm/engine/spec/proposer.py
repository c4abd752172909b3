"""The proposer interface and its registry by method name.

A proposer guesses up to k next tokens for each sequence of a decode batch. Its guesses are drafts: the target
model verifies them, so a proposer only changes speed, never the output. A new kind (an EAGLE-style head, say)
is one file that subclasses Proposer and registers it:

    @register_proposer("eagle")
    class EagleProposer(Proposer):
        def propose(self, seqs, max_tokens): ...
        def observe(self, seqs, hidden): ...   # after each verify step

then `speculative_config={"method": "eagle", ...}`. A plugin module is imported by name before the engine is
built (e.g. `import my_eagle`), or named in `speculative_config.method` as "package.module:eagle", which the
registry imports on first use.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

from nanovllm.config import SpeculativeConfig
from nanovllm.engine.sequence import Sequence

PROPOSERS: dict[str, type[Proposer]] = {}


class Proposer(ABC):
    """Guesses the next tokens of decoding sequences. `engine` is the LLMEngine (its runner, tokenizer and
    config), for proposers that need a model of their own or the target's vocabulary.

    `cheap`: propose() costs microseconds and its drafts depend only on the sequences' tokens (a lookup, no model).
    The engine then asks it, while a batch finds no drafts, whether the next decode step may run ahead of the
    tokens in flight (Speculator.nothing_to_draft), and pipelines greedy verify steps: with `propose_on_device`
    when it is `on_device` (it then proposes inside the verify graph, after the tokens the step before actually
    kept), else with `propose_after` (a guess of what the step in flight keeps); other proposers are asked only
    for the drafts of a step, once the step before is read."""

    cheap: bool = False
    on_device: bool = False

    def __init__(self, config: SpeculativeConfig, engine):
        self.config = config
        self.engine = engine

    @abstractmethod
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[list[int]]:
        """Up to `max_tokens[i]` guessed tokens to follow `seqs[i].token_ids` (its last token is the one the
        target has not computed yet); an empty list when there is no good guess. Drafts are greedy guesses:
        the verifier treats each as proposed with probability one (see rejection.py)."""

    def propose_after(self, seqs: list[Sequence], assumed: list[list[int]],
                      max_tokens: list[int]) -> list[list[int]]:
        """For the step after one in flight (cheap proposers): a guess of the next token the step in flight gives
        after `assumed[i]` (those of its drafts taken as kept), then up to `max_tokens[i]` drafts to follow that
        guess; the history is `seqs[i].token_ids` followed by `assumed[i]`. An empty list when there is no guess.
        By default propose() on the tokens so extended."""
        sizes = [len(seq.token_ids) for seq in seqs]
        for seq, extra in zip(seqs, assumed):
            seq.token_ids.extend(extra)
        try:
            return [list(p) for p in self.propose(seqs, [m + 1 if m > 0 else 0 for m in max_tokens])]
        finally:
            for seq, size in zip(seqs, sizes):
                del seq.token_ids[size:]

    def propose_on_device(self, history: torch.Tensor, lengths: torch.Tensor,
                          caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For `on_device` proposers, inside a captured verify step (fixed shapes, no host reads): row i's tokens
        are history[i, :lengths[i]], its last one the next step's first input. Returns (drafts (b, k), counts
        (b,)): row i's drafts are drafts[i, :counts[i]], at most caps[i] (clamped to [0, k])."""
        raise NotImplementedError(f"{type(self).__name__} does not propose on the device")

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor | None) -> None:
        """Called after each verify step with its sequences, once their kept tokens are known (a head's state;
        nothing by default). `hidden` is reserved for the target's final hidden states of the verify rows,
        which an EAGLE-style head reads; the verify step passes None until a head needs them."""
        return None

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: drop any state kept for it."""
        return None

    def close(self) -> None:
        """Free the proposer's memory (a draft model's weights and KV cache)."""
        return None


def register_proposer(method: str):
    """Class decorator: `speculative_config.method == method` builds this proposer."""
    def wrap(cls: type[Proposer]) -> type[Proposer]:
        if not (isinstance(cls, type) and issubclass(cls, Proposer)):
            raise TypeError(f"proposer {method!r} must subclass nanovllm.engine.spec.Proposer")
        PROPOSERS[method] = cls
        return cls
    return wrap


def _load_builtin() -> None:
    from nanovllm.engine.spec import draft_model, ngram, oracle  # noqa: F401  (they register themselves)


def make_proposer(config: SpeculativeConfig, engine) -> Proposer:
    """The proposer `config.method` names: a registered name, or "module:name" (the module is imported and
    registers the name)."""
    _load_builtin()
    method = config.method
    if method not in PROPOSERS and ":" in method:
        module, _, name = method.partition(":")
        importlib.import_module(module)
        method = name
    if method not in PROPOSERS:
        raise ValueError(f"unknown speculative_config method {config.method!r}; registered: {sorted(PROPOSERS)}")
    return PROPOSERS[method](config, engine)
