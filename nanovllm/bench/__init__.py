"""The benchmark suite: python -m nanovllm.bench {latency,throughput,ops,peers,roofline,profile,all,paths,compare,
baseline,plot}

One module per job:
  presets     kernel presets -> engines, through Hydra's compose API (the same files `nanovllm.run` uses)
  latency     batch-1 decode time per token at several contexts (llm.stream timestamps)
  throughput  nano-vllm's offline workload: 256 random requests, output tok/s
  op_cases    per-op inputs at the model's shapes and the bytes each op must move at least
  timing      device timing: CUDA graphs of back-to-back launches over rotating input copies
  op_bench    every registered implementation of every op, timed, as GB/s and % of bandwidth
  peers       transformers eager and transformers static cache + torch.compile on the same weights
  roof        batch-1 roofline tok/s per context over the device's bandwidth
  steps       one batch-1 decode step at a time through the engine (profiling, pytest-benchmark)
  profiling   torch.profiler: launches per decode step, time per op kind, top kernels, Chrome trace
  results     the results file: provenance, naming, saving
  suite       `all`: every part in one process under a time budget
  paths       every execution path's logits against transformers on the same weights
  compare     ratio B/A per entry, non-zero exit on a regression; a run against its GPU's baseline
  baseline    the per-GPU baseline files (benchmarks/baseline/<gpu>.json) compare gates against
  plot        tok/s per preset against targets, peers and the roofline
"""
