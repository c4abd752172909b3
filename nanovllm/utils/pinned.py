"""Page-locked host memory of exactly the size asked for.

torch's caching host allocator (`pin_memory=True`) rounds every block up to the next power of two, so a 12 GiB
buffer pins 16 GiB. A large long-lived buffer is instead allocated as plain memory and registered with
cudaHostRegister, which pins exactly its pages; it is unregistered when the tensor is collected.
"""

from __future__ import annotations

import weakref

import torch


def pinned_empty(shape, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialized CPU tensor in page-locked memory (host-to-device copies from it run asynchronously). Keep
    this tensor alive while views of it are in use: its memory is unpinned when it is collected."""
    tensor = torch.empty(shape, dtype=dtype)
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes == 0:
        return tensor
    try:
        cudart = torch.cuda.cudart()
        register, unregister, success = cudart.cudaHostRegister, cudart.cudaHostUnregister, cudart.cudaError.success
        registered = register(tensor.data_ptr(), num_bytes, 0) == success
    except (AttributeError, RuntimeError, TypeError):  # a torch without these bindings: the caching allocator
        registered = False
    if not registered:
        return tensor.pin_memory()
    weakref.finalize(tensor, unregister, tensor.data_ptr())
    return tensor
