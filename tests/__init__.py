"""The CPU test suite (`python -m pytest -m "not gpu" -q`), one folder per area:

ops/     the op registry and every kernel backend against the native ops (Triton through its interpreter)
engine/  scheduler, KV cache, sampling, CUDA-graph and async paths, bad input
models/  model families against transformers, the model catalog, GGUF, the tokenizer, real weights (slow)
serve/   the OpenAI-compatible server: API, errors, load, fuzzing, its entry point
bench/   `python -m nanovllm.run` and `python -m nanovllm.bench`
config/  the Hydra configs

Fixtures shared by every area live in conftest.py (tiny checkpoints, a float64 engine), plain helpers in
helpers.py. Tests write only under pytest's temporary folders.
"""
