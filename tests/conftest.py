import os
import sys

import torch

# Shared test helpers (tests/distributed.py, tests/gpt_harness.py) import by plain name,
# in pytest and in the worker processes it spawns.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under Triton's interpreter. Triton reads this when a
# kernel is defined (on first import of polycom_megatron.ops.*_triton), so it is set here,
# before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
