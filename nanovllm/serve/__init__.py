"""OpenAI-compatible HTTP serving: `python -m nanovllm.serve` (see docs/deployment.md).

    from nanovllm.serve import create_app
    app = create_app(LLMEngine(EngineConfig(...)), model_name="my-model")   # then run it with uvicorn
"""

from nanovllm.serve.app import create_app

__all__ = ["create_app"]
