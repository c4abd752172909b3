"""One decode step at a time through the engine: `batch` requests (batch 1 by default) are prefilled, then
each `step()` is one scheduler step that decodes one token of each (CUDA-graph replay where the engine
captured graphs). For the profiler and pytest-benchmark, which need a callable per step rather than a
stream."""

from __future__ import annotations

from nanovllm.sampling_params import SamplingParams
from nanovllm.speed import prompt_ids


class DecodeSteps:
    def __init__(self, llm, context: int = 128, max_steps: int = 4096, tag: int = 4242, batch: int = 1,
                 temperature: float = 0.0):
        self.engine = llm.engine
        if self.engine.has_unfinished():
            raise RuntimeError("decode steps need an idle engine")
        if not 1 <= batch <= llm.config.max_num_seqs:
            raise ValueError(f"batch {batch} is outside 1..max_num_seqs ({llm.config.max_num_seqs})")
        prompts = [prompt_ids(llm.tokenizer, context, tag + i) for i in range(batch)]  # distinct: no prefix hits
        room = llm.config.max_model_len - max(map(len, prompts)) - 1
        max_steps = min(max_steps, room)
        # as many tokens as fit, not max_steps: with chunked prefill the first requests decode while later
        # ones still prefill, and must not finish before the last has taken its max_steps (close() aborts)
        params = SamplingParams(temperature=temperature, max_tokens=room + 1, ignore_eos=True)
        self.request_ids = [self.engine.add_request(ids, params) for ids in prompts]
        self.left = max_steps
        started: set[str] = set()
        while len(started) < batch:  # prefill (maybe chunked) until every request has its first token
            started |= {out.request_id for out in self.engine.step() if out.token_ids}

    def _step(self) -> bool:
        return any(out.token_ids for out in self.engine.step())

    def step(self) -> None:
        if self.left <= 0:
            raise RuntimeError("the request has no decode steps left; make DecodeSteps with a larger max_steps")
        self.left -= 1
        if not self._step():
            raise RuntimeError("a decode step produced no token")

    def close(self) -> None:
        for request_id in self.request_ids:
            self.engine.abort_request(request_id)

    def __enter__(self) -> DecodeSteps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
