import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.  The variable is
# read when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
