"""Every field of OpenAI's completion and chat request schemas and of vLLM's extra sampling fields, sent one at
a time with a value that turns it on: each is honoured (200; tests/serve/test_serve_sampling_fields.py and
tests/engine/test_logits_adjustments.py check what the honoured ones do) or refused with a 400 naming it,
never silently ignored. Fields owned by the structured-outputs and tools work are listed apart."""

from __future__ import annotations

import httpx
import pytest

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=64, max_num_seqs=4)
CHAT = [{"role": "user", "content": "Hi"}]

OK, REFUSED = "honoured", "refused"

# field -> (request fields that turn it on, outcome). Companion fields ride along where one needs another.
OPENAI_COMPLETION = {
    "model": ({"model": "tiny"}, OK),
    "prompt": ({"prompt": [1, 2, 3]}, OK),
    "best_of": ({"best_of": 2, "n": 2}, OK),          # equal to n; best_of > n is refused (tests/test_serve_errors)
    "echo": ({"echo": True}, OK),
    "frequency_penalty": ({"frequency_penalty": 0.5}, OK),
    "logit_bias": ({"logit_bias": {"5": 3}}, OK),
    "logprobs": ({"logprobs": 2}, OK),
    "max_tokens": ({"max_tokens": 3}, OK),
    "n": ({"n": 2}, OK),
    "presence_penalty": ({"presence_penalty": 0.5}, OK),
    "seed": ({"seed": 7}, OK),
    "stop": ({"stop": ["x"]}, OK),
    "stream": ({"stream": True}, OK),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, OK),
    "suffix": ({"suffix": "end"}, REFUSED),
    "temperature": ({"temperature": 0.5}, OK),
    "top_p": ({"top_p": 0.9}, OK),
    "user": ({"user": "someone"}, OK),
}

OPENAI_CHAT = {
    "messages": ({"messages": CHAT}, OK),
    "model": ({"model": "tiny"}, OK),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, REFUSED),
    "frequency_penalty": ({"frequency_penalty": 0.5}, OK),
    "function_call": ({"function_call": "auto"}, REFUSED),
    "functions": ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, REFUSED),
    "logit_bias": ({"logit_bias": {"5": 3}}, OK),
    "logprobs": ({"logprobs": True}, OK),
    "max_completion_tokens": ({"max_completion_tokens": 3}, OK),
    "max_tokens": ({"max_tokens": 3}, OK),
    "metadata": ({"metadata": {"k": "v"}}, REFUSED),
    "modalities": ({"modalities": ["text", "audio"]}, REFUSED),
    "n": ({"n": 2}, OK),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, REFUSED),
    "presence_penalty": ({"presence_penalty": 0.5}, OK),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, OK),     # a routing hint: prefix caching is automatic
    "reasoning_effort": ({"reasoning_effort": "low"}, REFUSED),
    "safety_identifier": ({"safety_identifier": "someone"}, OK),  # like user: accepted, recorded nowhere
    "seed": ({"seed": 7}, OK),
    "service_tier": ({"service_tier": "flex"}, REFUSED),     # "auto" and "default" are honoured
    "stop": ({"stop": "x"}, OK),
    "store": ({"store": True}, REFUSED),                     # false is honoured
    "stream": ({"stream": True}, OK),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, OK),
    "temperature": ({"temperature": 0.5}, OK),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, OK),
    "top_p": ({"top_p": 0.9}, OK),
    "user": ({"user": "someone"}, OK),
    "verbosity": ({"verbosity": "low"}, REFUSED),
    "web_search_options": ({"web_search_options": {}}, REFUSED),
}

# vLLM's extra fields (its SamplingParams' API fields and the request extras), on both endpoints.
VLLM_EXTRA = {
    "top_k": ({"top_k": 5}, OK),
    "min_p": ({"min_p": 0.1}, OK),
    "repetition_penalty": ({"repetition_penalty": 1.2}, OK),
    "stop_token_ids": ({"stop_token_ids": [5]}, OK),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True, "stop": ["x"]}, OK),
    "ignore_eos": ({"ignore_eos": True}, OK),
    "min_tokens": ({"min_tokens": 2}, OK),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 2}, OK),
    "prompt_logprobs": ({"prompt_logprobs": 1}, OK),
    "use_beam_search": ({"use_beam_search": True}, REFUSED),
    "length_penalty": ({"length_penalty": 2.0}, REFUSED),
    "early_stopping": ({"early_stopping": True}, REFUSED),
    "allowed_token_ids": ({"allowed_token_ids": [1, 2]}, REFUSED),
    "bad_words": ({"bad_words": ["x"]}, REFUSED),
    "skip_special_tokens": ({"skip_special_tokens": False}, REFUSED),
    "spaces_between_special_tokens": ({"spaces_between_special_tokens": False}, REFUSED),
    "logits_processors": ({"logits_processors": ["a.b"]}, REFUSED),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True}, REFUSED),
    "return_token_ids": ({"return_token_ids": True}, REFUSED),
    "priority": ({"priority": 1}, REFUSED),
    "cache_salt": ({"cache_salt": "s"}, REFUSED),
    "kv_transfer_params": ({"kv_transfer_params": {"a": 1}}, REFUSED),
    "vllm_xargs": ({"vllm_xargs": {"a": 1}}, REFUSED),
    "request_id": ({"request_id": "r1"}, REFUSED),
    "mm_processor_kwargs": ({"mm_processor_kwargs": {"a": 1}}, REFUSED),
    "media_io_kwargs": ({"media_io_kwargs": {"a": 1}}, REFUSED),
}
VLLM_COMPLETION = {
    "add_special_tokens": ({"add_special_tokens": False}, REFUSED),  # true (what completions do) is honoured
    "prompt_embeds": ({"prompt_embeds": "AAAA"}, REFUSED),
}
VLLM_CHAT = {
    "echo": ({"echo": True}, OK),
    "chat_template_kwargs": ({"chat_template_kwargs": {"enable_thinking": False}}, OK),
    "add_special_tokens": ({"add_special_tokens": True}, REFUSED),  # false (what chat does) is honoured
    "add_generation_prompt": ({"add_generation_prompt": False}, REFUSED),
    "continue_final_message": ({"continue_final_message": True}, REFUSED),
    "chat_template": ({"chat_template": "{{ messages }}"}, REFUSED),
    "documents": ({"documents": [{"title": "t", "text": "x"}]}, REFUSED),
}
# Off values that must stay accepted (what the server does anyway).
HONOURED_OFF_VALUES = [
    ("/v1/chat/completions", {"store": False}), ("/v1/chat/completions", {"service_tier": "auto"}),
    ("/v1/chat/completions", {"modalities": ["text"]}), ("/v1/completions", {"add_special_tokens": True}),
    ("/v1/chat/completions", {"add_special_tokens": False}), ("/v1/completions", {"use_beam_search": False}),
    ("/v1/completions", {"skip_special_tokens": True}), ("/v1/chat/completions", {"add_generation_prompt": True}),
]
# Owned by the structured-outputs and tools work: left as they are here.
OWNED_ELSEWHERE = {"response_format", "tools", "tool_choice", "parallel_tool_calls", "structured_outputs",
                   "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                   "guided_whitespace_pattern"}

CASES = ([("/v1/completions", f, *v) for f, v in {**OPENAI_COMPLETION, **VLLM_EXTRA, **VLLM_COMPLETION}.items()]
         + [("/v1/chat/completions", f, *v) for f, v in {**OPENAI_CHAT, **VLLM_EXTRA, **VLLM_CHAT}.items()])


@pytest.fixture(scope="module")
def client(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def post(client, path: str, fields: dict) -> httpx.Response:
    base = {"prompt": "hello"} if path == "/v1/completions" else {"messages": CHAT}
    return client.post(path, json={**base, "max_tokens": 3, "temperature": 0, **fields})


def test_no_field_is_listed_twice_or_owned_and_handled():
    for table in (OPENAI_COMPLETION, OPENAI_CHAT, VLLM_EXTRA, VLLM_COMPLETION, VLLM_CHAT):
        assert not OWNED_ELSEWHERE & set(table)


@pytest.mark.parametrize("path,field,fields,outcome", CASES, ids=[f"{c[0].split('/')[-1]}-{c[1]}" for c in CASES])
def test_each_field_is_honoured_or_refused(client, path, field, fields, outcome):
    r = post(client, path, fields)
    if outcome == OK:
        assert r.status_code == 200, r.text
        if fields.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], err


@pytest.mark.parametrize("path,fields", HONOURED_OFF_VALUES)
def test_off_values_of_refused_fields_are_accepted(client, path, fields):
    assert post(client, path, fields).status_code == 200
