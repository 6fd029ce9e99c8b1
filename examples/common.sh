# Shared launch logic for the example scripts; sourced, never run on its own.
#
# A model script sets its architecture (NAME, NUM_LAYERS, HIDDEN, NUM_HEADS, FFN_HIDDEN,
# ACTIVATION (polynorm, polyrelu, their gated forms polynorm-glu, polyrelu-glu, or swiglu),
# and for MoE NUM_EXPERTS, TOPK, MOE_FFN_HIDDEN), may set defaults for the knobs
# below, sources this file and calls `launch "$@"`. Every knob is an environment variable;
# arguments after the script's own options are passed to Megatron unchanged.
#
#   cluster    NNODES NODE_RANK GPUS_PER_NODE MASTER_ADDR MASTER_PORT
#   layout     TP PP EP ETP CP SP(auto|0|1: auto = on when TP > 1)
#   batch      MICRO_BATCH GLOBAL_BATCH SEQ_LEN TRAIN_TOKENS (or TRAIN_ITERS)
#   memory     RECOMPUTE (none|selective|full)
#   precision  PRECISION (bf16|fp8) FP8_FORMAT (hybrid|e4m3) FP8_RECIPE (delayed|tensorwise|blockwise|mxfp8)
#   state      CKPT_DIR SAVE_INTERVAL RESUME (auto: continue from CKPT_DIR if it holds one | 0)
#   logging    TENSORBOARD_DIR WANDB_PROJECT (optional) WANDB_EXP_NAME
#   data       DATA_PATH TOKENIZER_TYPE TOKENIZER_MODEL, or MOCK_DATA=1 (synthetic, for smoke runs)
#   tools      LAUNCHER (polycom-megatron) PYTHON (python3) POLYCOM_KERNEL (auto)
#
# --dry-run prints the resolved command after checking that the layout divides; nothing
# touches a GPU before those checks pass, in a dry run or a real one.

set -euo pipefail

die() {
    echo "${NAME:-example}: $*" >&2
    exit 1
}

one_of() {  # one_of KNOB VALUE CHOICE... : refuse a value outside the choices, naming the knob
    local knob=$1 value=$2
    shift 2
    local choice
    for choice in "$@"; do
        [[ "$value" == "$choice" ]] && return 0
    done
    die "$knob=$value is not one of: $*"
}

positive() {  # positive KNOB VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1=$2 must be a positive integer"
}

set_defaults() {
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    MASTER_ADDR=${MASTER_ADDR:-localhost}
    MASTER_PORT=${MASTER_PORT:-6000}
    TP=${TP:-1} PP=${PP:-1} EP=${EP:-1} ETP=${ETP:-$TP} CP=${CP:-1} SP=${SP:-auto}
    MICRO_BATCH=${MICRO_BATCH:-1}
    GLOBAL_BATCH=${GLOBAL_BATCH:-64}
    SEQ_LEN=${SEQ_LEN:-4096}
    RECOMPUTE=${RECOMPUTE:-selective}
    PRECISION=${PRECISION:-bf16} FP8_FORMAT=${FP8_FORMAT:-hybrid} FP8_RECIPE=${FP8_RECIPE:-delayed}
    RUN_DIR=${RUN_DIR:-runs/$NAME}
    CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}
    SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
    RESUME=${RESUME:-auto}
    TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
    WANDB_PROJECT=${WANDB_PROJECT:-}
    WANDB_EXP_NAME=${WANDB_EXP_NAME:-$NAME}
    MOCK_DATA=${MOCK_DATA:-0}
    DATA_PATH=${DATA_PATH:-}
    TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
    TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
    VOCAB_SIZE=${VOCAB_SIZE:-32000}  # only for MOCK_DATA (NullTokenizer)
    LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-2000}
    POLYCOM_KERNEL=${POLYCOM_KERNEL:-auto}
    MOE_GROUPED_GEMM=${MOE_GROUPED_GEMM:-1}
    LAUNCHER=${LAUNCHER:-polycom-megatron}
    PYTHON=${PYTHON:-python3}
    if [[ "$SP" == auto ]]; then
        SP=$((TP > 1 ? 1 : 0))
    fi
    if [[ -z "${TRAIN_ITERS:-}" ]]; then
        [[ "${TRAIN_TOKENS:-}" =~ ^[1-9][0-9]*$ ]] ||
            die "TRAIN_TOKENS=${TRAIN_TOKENS:-} must be a positive integer (or set TRAIN_ITERS)"
        # Round up: a run never stops short of its token budget.
        TRAIN_ITERS=$(((TRAIN_TOKENS + GLOBAL_BATCH * SEQ_LEN - 1) / (GLOBAL_BATCH * SEQ_LEN)))
    fi
}

check_knobs() {
    local knob
    for knob in NNODES GPUS_PER_NODE MASTER_PORT TP PP EP ETP CP MICRO_BATCH GLOBAL_BATCH \
        SEQ_LEN TRAIN_ITERS SAVE_INTERVAL; do
        positive "$knob" "${!knob}"
    done
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && ((NODE_RANK < NNODES)) ||
        die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES)"
    one_of SP "$SP" 0 1
    one_of RECOMPUTE "$RECOMPUTE" none selective full
    one_of PRECISION "$PRECISION" bf16 fp8
    one_of FP8_FORMAT "$FP8_FORMAT" hybrid e4m3
    one_of FP8_RECIPE "$FP8_RECIPE" delayed tensorwise blockwise mxfp8
    one_of RESUME "$RESUME" auto 0
    one_of ACTIVATION "$ACTIVATION" polynorm polyrelu polynorm-glu polyrelu-glu swiglu
    if [[ "$MOCK_DATA" != 1 ]]; then
        [[ -n "$DATA_PATH" ]] || die "set DATA_PATH (Megatron --data-path prefix), or MOCK_DATA=1 for synthetic data"
        [[ -n "$TOKENIZER_MODEL" ]] || die "set TOKENIZER_MODEL (with TOKENIZER_TYPE=$TOKENIZER_TYPE), or MOCK_DATA=1"
    fi
}

check_layout() {
    local moe=()
    if [[ -n "${NUM_EXPERTS:-}" ]]; then
        moe=(--num-experts "$NUM_EXPERTS" --moe-ffn-hidden-size "$MOE_FFN_HIDDEN")
    fi
    "$PYTHON" -m polycom_megatron.layout \
        --world-size $((NNODES * GPUS_PER_NODE)) --tp "$TP" --pp "$PP" --ep "$EP" \
        --etp "$ETP" --cp "$CP" --sequence-parallel "$SP" \
        --num-layers "$NUM_LAYERS" --num-heads "$NUM_HEADS" \
        --num-query-groups "${NUM_QUERY_GROUPS:-$NUM_HEADS}" \
        --ffn-hidden-size "$FFN_HIDDEN" "${moe[@]}" \
        --micro-batch "$MICRO_BATCH" --global-batch "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" ||
        die "fix the knobs above (see the top of examples/common.sh)"
}

megatron_args() {
    # Llama-style body shared by every example (anchors: RMSNorm, RoPE, untied, no biases).
    ARGS=(
        --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$NUM_HEADS"
        --ffn-hidden-size "$FFN_HIDDEN"
        --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
        --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights
        --disable-bias-linear --attention-dropout 0 --hidden-dropout 0 --init-method-std 0.02
    )
    if [[ -n "${NUM_QUERY_GROUPS:-}" && "$NUM_QUERY_GROUPS" != "$NUM_HEADS" ]]; then
        ARGS+=(--group-query-attention --num-query-groups "$NUM_QUERY_GROUPS")
    fi
    if [[ "$ACTIVATION" == swiglu ]]; then
        ARGS+=(--swiglu)
    else
        # polynorm-glu: --polycom-activation polynorm --polycom-gated (PolyNorm(gate) * up).
        ARGS+=(--polycom-activation "${ACTIVATION%-glu}" --polycom-kernel "$POLYCOM_KERNEL")
        [[ "$ACTIVATION" == *-glu ]] && ARGS+=(--polycom-gated)
    fi
    if [[ -n "${NUM_EXPERTS:-}" ]]; then
        # Dropless: no --moe-expert-capacity-factor, so no token is ever dropped.
        ARGS+=(
            --num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK"
            --moe-ffn-hidden-size "$MOE_FFN_HIDDEN"
            --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss
            --moe-aux-loss-coeff "$MOE_AUX_LOSS" --moe-z-loss-coeff "$MOE_Z_LOSS"
            --expert-model-parallel-size "$EP" --expert-tensor-parallel-size "$ETP"
        )
        [[ "$MOE_GROUPED_GEMM" == 1 ]] && ARGS+=(--moe-grouped-gemm)
        [[ "$ACTIVATION" == swiglu ]] || ARGS+=(--polycom-coeff-mode "${POLYCOM_COEFF_MODE:-layer}")
    fi

    ARGS+=(
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --context-parallel-size "$CP" --use-distributed-optimizer
        --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
        --train-iters "$TRAIN_ITERS"
        --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS"
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
        --bf16
    )
    [[ "$SP" == 1 ]] && ARGS+=(--sequence-parallel)
    case "$RECOMPUTE" in
        selective) ARGS+=(--recompute-granularity selective) ;;
        full) ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
    esac
    [[ "$PRECISION" == fp8 ]] && ARGS+=(--fp8-format "$FP8_FORMAT" --fp8-recipe "$FP8_RECIPE")

    # Saving and resuming: Megatron continues from the newest checkpoint under --load.
    ARGS+=(--save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist)
    [[ "$RESUME" == auto ]] && ARGS+=(--load "$CKPT_DIR")

    ARGS+=(
        --log-interval 10 --log-throughput --eval-interval 1000 --eval-iters 10
        --tensorboard-dir "$TENSORBOARD_DIR" --tensorboard-log-interval 10
        --log-timers-to-tensorboard
    )
    if [[ -n "$WANDB_PROJECT" ]]; then
        ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "$WANDB_EXP_NAME"
            --wandb-save-dir "$RUN_DIR/wandb")
    fi
    if [[ "$MOCK_DATA" == 1 ]]; then
        ARGS+=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
    else
        # Unquoted on purpose: a blend is "weight prefix weight prefix ...".
        ARGS+=(--data-path $DATA_PATH --split 99,1,0
            --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
    fi
}

usage() {
    cat <<EOF
usage: $0 [--dry-run] [extra Megatron arguments...]

Launches $NAME with torchrun on this node (set NNODES, NODE_RANK, MASTER_ADDR,
MASTER_PORT, GPUS_PER_NODE for several nodes; see examples/slurm.sbatch for SLURM).
Knobs are environment variables, listed at the top of examples/common.sh.
--dry-run checks the layout and prints the resolved command without running it.
EOF
}

launch() {
    local dry_run=0
    local extra=()
    while (($#)); do
        case "$1" in
            --dry-run) dry_run=1 ;;
            -h | --help) usage; return 0 ;;
            *) extra+=("$1") ;;
        esac
        shift
    done

    set_defaults
    check_knobs
    check_layout
    megatron_args
    ARGS+=("${extra[@]}")

    # CUDA_DEVICE_MAX_CONNECTIONS=1 keeps tensor-parallel communication ordered before
    # compute, which Megatron's TP/SP overlap relies on.
    local cmd=(env CUDA_DEVICE_MAX_CONNECTIONS=1
        torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        --no-python "$LAUNCHER" pretrain "${ARGS[@]}")

    if [[ "$RESUME" == auto && -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]]; then
        echo "resume: from iteration $(cat "$CKPT_DIR/latest_checkpointed_iteration.txt") in $CKPT_DIR"
    fi
    if ((dry_run)); then
        echo "command:"
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    mkdir -p "$CKPT_DIR" "$TENSORBOARD_DIR"
    exec "${cmd[@]}"
}
