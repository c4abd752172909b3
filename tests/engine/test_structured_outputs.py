"""Grammar-constrained decoding on the tiny random model: outputs match their grammar, and unconstrained
requests batched with constrained ones decode exactly as they do alone."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import jsonschema
import pytest

from nanovllm.engine.step_mode import GREEDY, StepMode
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured import StructuredOutput, ToolCallFormat

# Every field bounded, so even a random model reaches the end of the object within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON:", "hello world", "1 2 3 4"]


def params(structured=None, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 96, **kw}, structured=structured)


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=7),
                                      dict(temperature=0.8, top_p=0.9, top_k=50, seed=3)])
def test_json_schema_output_validates(tiny_llm, sampling):
    spec = StructuredOutput(json=SCHEMA)
    outs = tiny_llm.generate(PROMPTS, [params(spec, **sampling)] * len(PROMPTS))
    for out in outs:
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert_all_blocks_free(tiny_llm)


def test_unconstrained_rows_decode_as_alone(tiny_llm):
    plain = [params(), params(temperature=1.0, seed=11)]
    alone = [r["token_ids"] for r in tiny_llm.generate(PROMPTS[:2], plain)]
    mixed = tiny_llm.generate(PROMPTS[:2] + PROMPTS, plain + [params(StructuredOutput(json=SCHEMA))] * 3)
    assert [r["token_ids"] for r in mixed[:2]] == alone
    for out in mixed[2:]:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_regex_and_choice(tiny_llm):
    outs = tiny_llm.generate(PROMPTS[:2], [params(StructuredOutput(regex=r"[a-c]{2,5}-[0-9]{3}")),
                                           params(StructuredOutput(choice=["yes", "no", "maybe so"]))])
    assert re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", outs[0]["text"]), outs[0]
    assert outs[1]["text"] in ("yes", "no", "maybe so")
    assert [o["finish_reason"] for o in outs] == ["stop", "stop"]


def test_json_object_starts_an_object(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0], params(StructuredOutput(json_object=True), max_tokens=24))[0]
    assert out["text"].startswith("{")
    if out["finish_reason"] == "stop":
        assert isinstance(json.loads(out["text"]), dict)


def test_ebnf_grammar(tiny_llm):
    spec = StructuredOutput(grammar='root ::= "(" [0-9] ("+" [0-9])? ")"')
    out = tiny_llm.generate(PROMPTS[0], params(spec, temperature=1.0, seed=1))[0]
    assert re.fullmatch(r"\([0-9](\+[0-9])?\)", out["text"]), out


def test_tool_call_grammar(tiny_llm):
    call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False}
    spec = StructuredOutput(tool_calls=ToolCallFormat((json.dumps(call),), parallel=False))
    out = tiny_llm.generate(PROMPTS[0], params(spec))[0]
    m = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", out["text"], re.S)
    assert m, out
    jsonschema.validate(json.loads(m.group(1)), call)


def test_bad_grammars_are_refused_by_name(tiny_llm):
    with pytest.raises(ValueError, match="json grammar does not compile"):
        tiny_llm.generate("x", params(StructuredOutput(json={"type": "nonsense"})))
    with pytest.raises(ValueError, match="regex grammar does not compile"):
        tiny_llm.generate("x", params(StructuredOutput(regex="(")))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="choice must be a list"):
        StructuredOutput(choice="ab")
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"json": {}})
    assert_all_blocks_free(tiny_llm)


def test_step_mode_masked_only_with_constrained_rows():
    def batch(*structured):
        return [SimpleNamespace(completes=True, seq=SimpleNamespace(params=params(s), num_completion_tokens=0,
                                                                   min_tokens_stop_ids=frozenset()))
                for s in structured]

    graphs = SimpleNamespace(fits=lambda batch: True)
    plain = StepMode.of(batch(None, None), graphs, async_scheduling=True)
    assert plain == StepMode(graph=True, sampling=GREEDY, run_ahead=True, masked=False)
    mixed = StepMode.of(batch(None, StructuredOutput(regex="a")), graphs, async_scheduling=True)
    assert mixed.masked and mixed.graph and mixed.run_ahead and mixed.deferred


def test_constrained_rows_launched_ahead_match_the_synchronous_engine(tiny_model, tiny_llm):
    """With async scheduling through (emulated) decode graphs, steps with constrained rows are launched ahead
    and sampled once the step before is read: the same tokens as the synchronous eager engine."""
    from tests.engine.test_adjusted_graph_steps import emulated

    llm = emulated(tiny_model, max_num_seqs=4, async_scheduling=True)
    runner, deferred = llm.engine.runner, []
    launch_decode = runner.launch_decode
    runner.launch_decode = lambda batch, prev=None, mode=None: deferred.append(
        prev is not None and runner.step_mode(batch).masked) or launch_decode(batch, prev, mode)
    specs = [StructuredOutput(regex="[a-e]{3,9}"), None, StructuredOutput(choice=["abc", "de"]),
             StructuredOutput(json={"type": "object", "properties": {"a": {"type": "integer"}}})]
    all_params = [params(s, temperature=t, seed=3) for s, t in zip(specs, (0, 0.8, 0, 0.7))]
    prompts = [*PROMPTS, "a b c"]
    got = [r["token_ids"] for r in llm.generate(prompts, all_params)]
    assert got == [r["token_ids"] for r in tiny_llm.generate(prompts, all_params)]
    assert any(deferred), "no constrained step was launched ahead"
    assert_all_blocks_free(llm)


def test_parallel_tool_call_grammar_accepts_several_calls(tiny_llm):
    engine = tiny_llm.engine
    calls = tuple(json.dumps({"type": "object", "properties": {"name": {"const": n}, "arguments": {"type": "object"}},
                              "required": ["name", "arguments"]}) for n in ("f", "g"))
    matcher = engine.grammars.matcher(StructuredOutput(tool_calls=ToolCallFormat(calls, parallel=True)))
    text = ('<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    for token in engine.tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept_token(token), token
    assert matcher.is_completed() and matcher.accept_token(engine.tokenizer.eos_token_id)
    assert matcher.is_terminated()


def test_only_constrained_rows_go_through_logits(tiny_llm, monkeypatch):
    model = tiny_llm.engine.runner.model
    real, rows = model.compute_logits, []

    def compute_logits(hidden):
        rows.append(len(hidden))
        return real(hidden)

    monkeypatch.setattr(model, "compute_logits", compute_logits)
    spec = StructuredOutput(choice=["abc", "de"])
    tiny_llm.generate(PROMPTS, [params(), params(spec), params(temperature=1.0, seed=2)])
    assert rows and set(rows) == {1}
