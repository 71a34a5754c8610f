import os

import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
