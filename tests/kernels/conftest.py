"""Without a GPU, the Triton kernels still run: in Triton's interpreter, on CPU tensors, against the torch reference.

triton is a test dependency (the lock installs it), so CI checks every kernel's Triton version on its CPU;
a machine with CUDA runs them compiled instead. TRITON_INTERPRET is read when a kernel is first defined,
which kernels/ does lazily, so setting it here is in time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
