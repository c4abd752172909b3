"""Request and response schemas of the OpenAI-compatible API (pydantic: they validate input and
document the API at /openapi.json). Bounds are those of OpenAI's API where it has them; nano-vllm's
SamplingParams checks the values once more when the request is converted."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from nanovllm.engine.prompts import check_unicode

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1   # what torch.Generator.manual_seed accepts
INT32_MAX = 2**31 - 1
MAX_N = 16
MAX_STOP = 16
# A prompt is non-empty text or non-empty token ids (JSON true/false are not token ids), or a non-empty batch.
PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[list[Annotated[int, Strict()]], Field(min_length=1)]


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send extras (user, metadata, store, ...); NaN and
    # infinity are not numbers any parameter accepts.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value, info):
        """Every string a client sends must be encodable (a lone UTF-16 surrogate, as a JavaScript client
        sends after cutting an emoji in half, is not): a 400 naming the field, before any tokenizer sees it."""
        _check_strings(value, info.field_name)
        return value


def _check_strings(value, where: str) -> None:
    if isinstance(value, str):
        check_unicode(value, where)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int):  # a validated list[int] (token ids) holds no strings
            return
        for i, item in enumerate(value):
            _check_strings(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, f"a key of {where}")
            _check_strings(item, f"{where}.{key}")


class StreamOptions(_Request):
    include_usage: bool = False


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs`: exactly one of these."""
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="an EBNF grammar")
    json_object: bool | None = None


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""
    model: str | None = Field(None, description="must be the served model's id (see /v1/models)")
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="-1 or 0 disables (extension)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension")
    ignore_eos: bool = Field(False, description="extension")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted from the logit of each token "
                                           "already in the output")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted from the logit of each token "
                                            "once per occurrence in the output")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (vLLM): tokens of the prompt "
                                             "or output get positive logits divided, negative ones multiplied by it")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX, description="extension (vLLM): no EOS, stop token id "
                                   "or stop string ends the output before this many tokens")
    include_stop_str_in_output: bool = Field(False, description="extension (vLLM): keep the matched stop string")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="extension (vLLM): each prompt token's "
                                        "logprob and this many top alternatives (not with stream=true)")
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="extension (vLLM): keep only "
                                               "the last this many prompt tokens")
    user: str | None = Field(None, description="accepted and recorded nowhere")
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="vLLM: constrain the output to a JSON schema, regex, choice or EBNF grammar (extension)")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema (extension)")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression (extension)")
    guided_choice: list[str] | None = Field(None, description="vLLM: one of these strings (extension)")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF grammar (extension)")


class CompletionRequest(SamplingFields):
    prompt: PromptText | PromptIds | Annotated[list[PromptText], Field(min_length=1)] | Annotated[
        list[PromptIds], Field(min_length=1)] = Field(
        ..., description="text, token ids, or a batch of either")
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token")
    echo: bool = Field(False, description="prepend the prompt (and its logprobs, with logprobs) to each choice")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON object's text")


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls, passed back")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class JSONSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(_Request):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="deprecated alias of "
                                   "max_completion_tokens; default: up to max_model_len")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='passed to the chat template, e.g. {"enable_thinking": false} for Qwen3')
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default 'auto' with tools; 'required' and a named function are enforced by a grammar")
    parallel_tool_calls: bool | None = Field(None, description="default true: several calls in one answer")
    response_format: ResponseFormat | None = None
    echo: bool = Field(False, description="extension (vLLM): prepend the last message's content when it is the "
                       "assistant's, as vLLM does")


# ---- responses ------------------------------------------------------------------------------------------
class SpeculativeUsage(BaseModel):
    """Speculative decoding's work for the response's choices (extension): verify steps that had drafts,
    drafted tokens, the drafted tokens kept, and tokens emitted per such step (1 + kept / steps)."""
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    mean_accepted_length: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative_decoding: SpeculativeUsage | None = Field(
        None, description="extension: present when speculative decoding drafted tokens for the request")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's Logprob: a prompt token's (or an alternative's) logprob, rank and text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # None for the first prompt token, then token id -> entry


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed call: its first chunk has id, type and the function's name, the next ones its arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanovllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
