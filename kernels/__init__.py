"""Pure tensor functions: each a torch reference, a Triton kernel for CUDA, and a dispatcher that picks once.

Triton is imported lazily inside the kernels' modules, so importing rotary.kernels
works on machines without it.
"""

from .rope_shift import (
    selected_backend,
    shift_keys,
    shift_keys_reference,
    shift_keys_triton,
)

__all__ = ["selected_backend", "shift_keys", "shift_keys_reference", "shift_keys_triton"]
