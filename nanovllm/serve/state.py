"""What the route handlers share: the async engine, the tokenizer, the served model's identity."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.async_engine import AsyncEngine, QueueFullError, RequestFailedError, RequestStream
from nanovllm.serve.errors import APIError
from nanovllm.serve.logprobs import TokenText
from nanovllm.serve.prompts import PromptEncoder


@dataclass
class ServeState:
    engine: AsyncEngine
    model_name: str
    max_model_len: int
    tokenizer: object
    prompts: PromptEncoder
    token_text: TokenText = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.token_text = TokenText(self.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                           "(see /v1/models)", "model", "model_not_found")

    async def open(self, request_id: str, prompts: list, n: int, params: list[SamplingParams],
                   prompt_param: str) -> RequestStream:
        """Tokenize the prompts (text, token ids or a ChatPrompt) and add n engine requests for each, with
        `params` in that order, mapping refusals to OpenAI errors naming `prompt_param`."""
        limit = self.engine.max_queued_requests
        if len(prompts) * n > limit:
            raise APIError(400, f"the request asks for {len(prompts) * n} sequences (prompts x n) but the server "
                           f"queues at most {limit}", "n")
        try:
            token_ids = await self.prompts.encode(prompts, params[0].truncate_prompt_tokens if params else None)
            return await self.engine.stream(request_id, [ids for ids in token_ids for _ in range(n)], params).open()
        except ValueError as e:
            code = "context_length_exceeded" if "max_model_len" in str(e) else None
            raise APIError(400, str(e), prompt_param, code) from None
        except QueueFullError as e:
            raise APIError(429, str(e), None, "too_many_requests") from None
        except RequestFailedError as e:  # the engine stopped, or the server is shutting down
            raise APIError(e.status, str(e), None, e.code) from None
