"""One batch-1 decode step at a time through the engine: a request is prefilled, then each `step()` is
one scheduler step that decodes one token (CUDA-graph replay where the engine captured graphs). For
the profiler and pytest-benchmark, which need a callable per token rather than a stream."""

from __future__ import annotations

from nanovllm.sampling_params import SamplingParams
from nanovllm.speed import prompt_ids


class DecodeSteps:
    def __init__(self, llm, context: int = 128, max_steps: int = 4096, tag: int = 4242):
        self.engine = llm.engine
        if self.engine.has_unfinished():
            raise RuntimeError("decode steps need an idle engine")
        ids = prompt_ids(llm.tokenizer, context, tag)
        max_steps = min(max_steps, llm.config.max_model_len - len(ids) - 1)
        params = SamplingParams(temperature=0.0, max_tokens=max_steps + 1, ignore_eos=True)
        self.request_id = self.engine.add_request(ids, params)
        self.left = max_steps
        while not self._step():  # prefill (maybe chunked) until the first token comes out
            pass

    def _step(self) -> bool:
        return any(out.token_ids for out in self.engine.step())

    def step(self) -> None:
        if self.left <= 0:
            raise RuntimeError("the request has no decode steps left; make DecodeSteps with a larger max_steps")
        self.left -= 1
        if not self._step():
            raise RuntimeError("a decode step produced no token")

    def close(self) -> None:
        self.engine.abort_request(self.request_id)

    def __enter__(self) -> DecodeSteps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
