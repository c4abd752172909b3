"""LangChain's ChatOpenAI pointed at nano-vllm's server: a prompt | model | parser chain, whole and streamed.

    python -m nanovllm.serve model=tiny        # in another terminal: 127.0.0.1:8000, API key $NANOVLLM_API_KEY
    python examples/langchain_chat.py          # --base-url, --api-key and --model default to that server
"""

from __future__ import annotations

import argparse
import os

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "none"))
    p.add_argument("--model", help="the served model id (default: the one the server lists at /v1/models)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    model = args.model or OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0).models.list().data[0].id
    print(f"model: {model}")

    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, max_tokens=args.max_tokens,
                     temperature=0, max_retries=0, stream_usage=True,
                     # Qwen3: answer directly, without a <think> block
                     extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    prompt = ChatPromptTemplate.from_messages([("system", "You are a concise assistant."),
                                               ("user", "Name one fact about {topic}.")])
    chain = prompt | llm | StrOutputParser()

    print(f"invoke: {chain.invoke({'topic': 'the moon'})!r}")
    print("stream: ", end="", flush=True)
    for piece in chain.stream({"topic": "the sea"}):
        print(piece, end="", flush=True)
    print()
    reply = llm.invoke("Say hello.")
    print(f"usage: {reply.usage_metadata}")


if __name__ == "__main__":
    main()
