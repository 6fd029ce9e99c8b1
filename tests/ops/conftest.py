import os

import torch

# The Triton kernels run on CPU under Triton's interpreter. Triton reads this when a kernel
# is defined, i.e. when polycom_megatron.ops.*_triton is first imported, so it is set here,
# while this directory is collected and before any of its test modules imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
