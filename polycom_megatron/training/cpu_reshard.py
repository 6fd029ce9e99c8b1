"""Which changes of parallel layout a CPU-job checkpoint survives, decided before loading.

Found by experiment with megatron-core 0.16.1's ``dist_checkpointing`` and its
(non-distributed) Adam optimizer, each case resumed and compared step by step with an
uninterrupted run (tests/training/test_cpu_reshard.py):

- Dense models: any change of TP, PP and DP (world size) reshards model and optimizer.
- MoE models: TP, PP, DP and EP change freely while EP stays above 1, or stays 1.
  Between EP = 1 and EP > 1 the optimizer is built differently (megatron-core splits it
  into a dense and an expert part only when experts are expert-parallel), its saved keys
  do not match, and the load would fail inside megatron-core: refused here instead.
- The padded vocabulary (a multiple of 128 x TP) must not change size: the embedding and
  output layer are stored at the padded size.
- RNG states are per rank: restored when the world size is unchanged, otherwise the run
  continues with a freshly seeded RNG (only dropout draws on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import List


def layout_problems(saved: dict, now: dict, path: Path) -> List[str]:
    """One line per layout change from ``saved`` to ``now`` that cannot be resharded."""
    found = []
    if (saved["ep"] > 1) != (now["ep"] > 1):
        found.append(
            f"checkpoint {path} was saved at --ep {saved['ep']}, this run asks for --ep "
            f"{now['ep']}: megatron-core's optimizer state does not reshard between EP = 1 "
            f"and EP > 1; resume with --ep {saved['ep']}"
            + (" or another EP above 1" if saved["ep"] > 1 else "")
        )
    if saved["padded_vocab_size"] != now["padded_vocab_size"]:
        found.append(
            f"checkpoint {path} stores a vocabulary padded to {saved['padded_vocab_size']} "
            f"(--tp {saved['tp']}), this run pads it to {now['padded_vocab_size']} (--tp "
            f"{now['tp']}); resume with a --tp that pads --vocab-size to the same size"
        )
    return found
