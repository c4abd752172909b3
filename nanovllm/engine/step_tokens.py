"""A launched step's tokens, in one shape whatever the step: `read()` gives (tokens, logprobs) once they are on
the host. PendingTokens come from a step queued on the GPU, DeferredTokens from one whose sampling waits for the
step before it, ReadyTokens from a step that ran synchronously."""

from __future__ import annotations

import torch

from nanovllm.engine.step_buffers import KeptRows


class PendingTokens:
    """Tokens of a launched step: on the device at once, on the host when `tolist()` waits for them."""

    def __init__(self, tokens: torch.Tensor, graphs):
        self.device = tokens
        self.host, self.event = graphs.buffers.to_host(tokens)

    def rows(self, keep: list[int]) -> torch.Tensor | KeptRows:
        """The device tokens of rows `keep` (increasing indices) for a step launched on them: the tensor itself
        when that is every row, else KeptRows, which the decode graphs' upload gathers with no allocation."""
        return self.device if len(keep) == len(self.device) else KeptRows(self.device, keep)

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def read(self) -> tuple[list[int], list[None]]:
        """(tokens, logprobs): waits for the tokens; a step that runs ahead has no logprobs."""
        tokens = self.tolist()
        return tokens, [None] * len(tokens)

    def complete(self) -> None:
        """Queue whatever of the step is still to queue (nothing: its tokens are on their way)."""


class DeferredTokens(PendingTokens):
    """Tokens of a step launched ahead whose sampling needs the host's view of the step before (StepMode.deferred):
    its forward pass is queued at launch, its sampling by `complete()`, which the engine calls once the step
    before is read; `rows` and `tolist` complete it first if it was not."""

    def __init__(self, sample, graphs):
        self._sample, self._graphs, self.device = sample, graphs, None

    def complete(self) -> None:
        if self.device is None:
            super().__init__(self._sample(), self._graphs)

    def rows(self, keep: list[int]) -> torch.Tensor:
        self.complete()
        return super().rows(keep)

    def tolist(self) -> list[int]:
        self.complete()
        return super().tolist()


class ReadyTokens:
    """Tokens (and logprobs) of a step that ran synchronously, in PendingTokens' shape."""

    def __init__(self, tokens: list[int], logprobs: list[dict | None]):
        self.tokens, self.logprobs = tokens, logprobs

    def read(self) -> tuple[list[int], list[dict | None]]:
        return self.tokens, self.logprobs
