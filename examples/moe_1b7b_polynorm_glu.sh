#!/usr/bin/env bash
# MoE "1B active / 7B total" OLMoE-style GPT with PolyNorm-GLU experts, the gated form
# (PolyNorm(gate) * up per expert): the body of shared/notes/anchors.md, 16 layers, hidden
# 2048, 16 heads, 64 experts top-8, dropless, expert FFN 1024: SwiGLU's width and parameter
# count (moe_1b7b_swiglu.sh is its twin). Sequence 4096, global batch 1024, lr 4e-4, z-loss
# 1e-3, load-balancing loss 1e-2, 200B tokens.
# Usage: [KNOB=value ...] examples/moe_1b7b_polynorm_glu.sh [--dry-run] [Megatron args]; knobs: common.sh
NAME=moe-1b7b-polynorm-glu
NUM_LAYERS=16 HIDDEN=2048 NUM_HEADS=16
NUM_EXPERTS=64 TOPK=8 MOE_FFN_HIDDEN=1024
# Every layer is MoE, so --ffn-hidden-size builds nothing; it mirrors the expert width.
FFN_HIDDEN=$MOE_FFN_HIDDEN
MOE_AUX_LOSS=1e-2 MOE_Z_LOSS=1e-3
ACTIVATION=polynorm-glu
EP=${EP:-8}
# anchors.md gives no micro-batch or final lr for the MoE runs: 1 and 10% are our defaults.
MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
LR=${LR:-4e-4} MIN_LR=${MIN_LR:-4e-5}
TRAIN_TOKENS=${TRAIN_TOKENS:-200000000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
