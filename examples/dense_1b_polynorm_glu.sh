#!/usr/bin/env bash
# Dense "1B" Llama-style GPT with PolyNorm-GLU, the gated form (PolyNorm(gate) * up, as
# Motif-2.6B trains it): the dense 1B body of shared/notes/anchors.md, 24 layers, hidden 2048,
# 16 heads, FFN 5504: SwiGLU's width and parameter count (dense_1b_swiglu.sh is its twin).
# Sequence 4096, global batch 64, micro-batch 2, lr 3e-4 cosine to 3e-5, bf16, TP=1 PP=1,
# selective recompute, distributed optimizer.
# Usage: [KNOB=value ...] examples/dense_1b_polynorm_glu.sh [--dry-run] [Megatron args]; knobs: common.sh
NAME=dense-1b-polynorm-glu
NUM_LAYERS=24 HIDDEN=2048 NUM_HEADS=16
FFN_HIDDEN=5504
ACTIVATION=polynorm-glu
MICRO_BATCH=${MICRO_BATCH:-2} GLOBAL_BATCH=${GLOBAL_BATCH:-64}
LR=${LR:-3e-4} MIN_LR=${MIN_LR:-3e-5}
# anchors.md gives no token budget for the dense runs: 100B tokens is this script's default.
TRAIN_TOKENS=${TRAIN_TOKENS:-100000000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
