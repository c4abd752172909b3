"""Pre-quantized checkpoints: reading them as QuantizedWeights, and writing them.

- `detect(path, hf_config)`: the checkpoint's quantization method ("gguf", "fp8", "gptq", "awq",
  "compressed-tensors") or None for a dense checkpoint;
- `weight_formats(path, hf_config)`: HF dense weight name -> "fp8" | "int8" | "int4" for every linear weight
  stored quantized, from headers and config only (cheap, before loading);
- `quantized_tensors(path, hf_config)`: (HF name, Tensor | QuantizedWeight) for every tensor, each quantized
  linear repacked once into a QuantizedWeight;
- `write_checkpoint(tensors, out_dir, method, config)`: a GPTQ (int4) or compressed-tensors (fp8, int8, and
  int4 with layout="compressed-tensors") folder.

One module per format: gguf_native.py (with gguf_blocks.py), hf_fp8.py, compressed_tensors.py, gptq.py,
awq.py (GPTQ and AWQ share qweight_folder.py); writer.py writes.
"""

from __future__ import annotations

from nanovllm.quant.checkpoints.detect import detect
from nanovllm.quant.checkpoints.read import quantized_tensors, weight_formats
from nanovllm.quant.checkpoints.writer import write_checkpoint

__all__ = ["detect", "quantized_tensors", "weight_formats", "write_checkpoint"]
