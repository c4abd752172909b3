"""The official `openai` client against nano-vllm's server: nothing changes but base_url.

    python -m nanovllm.serve model=tiny        # in another terminal: 127.0.0.1:8000, API key $NANOVLLM_API_KEY
    python examples/openai_client.py           # --base-url and --api-key default to that server
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "none"),
                   help="the server's server.api_key, if it has one")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    # A plain completion, greedy, with the top-2 alternatives of each token.
    done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=args.max_tokens,
                                     temperature=0, logprobs=2)
    print(f"completion: {done.choices[0].text!r} ({done.usage.completion_tokens} tokens, "
          f"first token logprob {done.choices[0].logprobs.token_logprobs[0]:.2f})")

    # Chat through the model's chat template; Qwen3's thinking switched off (a vLLM-style extension).
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Why is the sky blue?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=args.max_tokens,
                                          temperature=0.7, seed=42,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    print(f"chat: {chat.choices[0].message.content!r} (finish_reason={chat.choices[0].finish_reason})")

    # The same, streamed token by token, with the usage in a last chunk.
    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=args.max_tokens,
                                            temperature=0.7, seed=42, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\nusage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")


if __name__ == "__main__":
    main()
