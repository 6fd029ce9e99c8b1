#!/usr/bin/env bash
# MoE "1B active / 7B total" OLMoE-style GPT with PolyNorm experts (shared/notes/anchors.md):
# 16 layers, hidden 2048, 16 heads, 64 experts top-8, dropless, expert FFN 1536 (1.5x the
# SwiGLU twin's 1024). Sequence 4096, global batch 1024, lr 4e-4, z-loss 1e-3, load-balancing
# loss 1e-2, 200B tokens.
# Usage: [KNOB=value ...] examples/moe_1b7b_polynorm.sh [--dry-run] [Megatron args]; knobs: common.sh
NAME=moe-1b7b-polynorm
NUM_LAYERS=16 HIDDEN=2048 NUM_HEADS=16
NUM_EXPERTS=64 TOPK=8 MOE_FFN_HIDDEN=${MOE_FFN_HIDDEN:-1536}
# Every layer is MoE, so --ffn-hidden-size builds nothing; it mirrors the expert width.
FFN_HIDDEN=${FFN_HIDDEN:-$MOE_FFN_HIDDEN}
MOE_AUX_LOSS=1e-2 MOE_Z_LOSS=1e-3
ACTIVATION=polynorm
EP=${EP:-8}
# anchors.md gives no micro-batch or final lr for the MoE runs: 1 and 10% are our defaults.
MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
LR=${LR:-4e-4} MIN_LR=${MIN_LR:-4e-5}
TRAIN_TOKENS=${TRAIN_TOKENS:-200000000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
