"""Tool calling through a real server on 127.0.0.1 (Qwen3's hermes-style <tool_call> blocks): `required` and a
named function forced by the grammar, `auto` parsed from a scripted model output (the tiny random model cannot
choose to call a tool), whole and streamed, with the openai client and LangChain's bind_tools."""

from __future__ import annotations

import json

import jsonschema
import pytest

from nanovllm.engine.step_tokens import ReadyTokens
from nanovllm.serve.background import serve_model
from nanovllm.serve.chat import chat_prompt
from nanovllm.serve.protocol import ChatCompletionRequest
from nanovllm.serve.tools import ToolCallStream, parse_tool_calls

ENGINE = dict(device="cpu", dtype="float32", max_model_len=768, num_kvcache_blocks=128, max_num_seqs=16)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCRIPT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(str(tiny_model), "tiny", **ENGINE) as s:
        yield s


@pytest.fixture
def scripted(server, monkeypatch):
    """The engine samples SCRIPT's tokens, then EOS, whatever the model computes."""
    engine = server.app.state.serve.engine.engine
    tokens = iter(engine.tokenizer.encode(SCRIPT, add_special_tokens=False) + [engine.tokenizer.eos_token_id])
    real = engine.runner.launch

    def launch(batch, prev=None):
        real(batch, prev)  # the forward pass runs; its tokens are replaced
        return ReadyTokens([next(tokens) for item in batch if item.completes], [None] * len(batch))

    monkeypatch.setattr(engine.runner, "launch", launch)


def check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_is_forced(openai_client):
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=9)):
        r = openai_client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, **sampling,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0], "get_time")


def test_required_tool_choice(openai_client):
    r = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0.9, seed=2)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    check_call(call)


def test_streamed_named_call_deltas(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
    first, *rest = calls
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    jsonschema.validate(json.loads("".join(tc.function.arguments or "" for tc in calls)), WEATHER)
    assert deltas[-1].finish_reason == "tool_calls"


def test_auto_parses_scripted_calls(openai_client, scripted):
    r = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    for call in message.tool_calls:
        check_call(call)


def test_auto_streams_scripted_calls(openai_client, scripted):
    stream = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    content = "".join(d.delta.content or "" for d in deltas)
    assert content.strip() == "Let me check." and "<tool_call" not in content
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["arguments"]) == {"zone": "CET"}
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_text(http, scripted):
    r = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, tools=TOOLS, tool_choice="none"))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == SCRIPT and choice["message"].get("tool_calls") is None
    assert choice["finish_reason"] == "stop"


def test_langchain_bind_tools(server, monkeypatch):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="unused", temperature=0, max_retries=0)
    answer = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke("Weather in Oslo?")
    assert isinstance(answer, AIMessage) and [c["name"] for c in answer.tool_calls] == ["get_weather"]
    jsonschema.validate(answer.tool_calls[0]["args"], WEATHER)
    # the call and its result go back into the template for the next turn
    follow = llm.bind_tools(TOOLS).invoke([HumanMessage("Weather in Oslo?"), answer,
                                           ToolMessage("4 degrees", tool_call_id=answer.tool_calls[0]["id"])])
    assert isinstance(follow, AIMessage)


def test_tool_messages_render_into_the_template(server):
    state = server.app.state.serve
    req = ChatCompletionRequest(tools=TOOLS, messages=MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}])
    prompt = chat_prompt(state, req, [t for t in TOOLS])
    text = state.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True,
                                               **prompt.template_kwargs)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "C"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>" in text


@pytest.mark.parametrize("fields,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": TOOLS[:1] * 2}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests(http, fields, param):
    r = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, **fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_parsers_keep_what_is_not_a_call():
    assert parse_tool_calls("plain text") == ("plain text", [])
    content, calls = parse_tool_calls("a <tool_call>\nnot json\n</tool_call> b")
    assert calls == [] and content == "a <tool_call>\nnot json\n</tool_call> b"
    stream = ToolCallStream()
    pieces = [stream.feed(t, False) for t in ["Hi <", "tool_", "call>\n{\"name\": \"f\", ", '"arguments": {}}\n</tool',
                                               "_call>"]] + [stream.feed(" <tool_call>{", True)]
    assert "".join(p[0] for p in pieces) == "Hi  <tool_call>{"
    assert [(i, c.function.name, c.function.arguments) for p in pieces for i, c in p[1]] == [(0, "f", "{}")]
