"""Megatron distributed checkpoints in and out, for the transformers export and import.

Reading: what model a checkpoint holds comes from its common state (``train_state["job"]``
of a ``train-cpu`` run, ``train_state["megatron_model"]`` of an ``import-hf`` checkpoint,
or Megatron-LM's ``args``); the model is then built at TP=PP=EP=1 on one gloo process and
``dist_checkpointing`` reshards whatever layout the checkpoint was saved at into it. Its
plain ``state_dict()`` is what ``convert.py`` maps.

Writing: the model is built at the requested layout on TP x PP x EP gloo ranks, loaded
from a TP=1 checkpoint of the weights (``dist_checkpointing`` reshards again), and saved
with a fresh optimizer and learning-rate schedule in the layout ``train-cpu --resume``
loads (``training/checkpoint.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from polycom_megatron.hf.convert import MegatronModel

# TransformerConfig fields that define the model (and those that the export refuses);
# everything else is a training or performance setting chosen again at load time.
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "layernorm_epsilon", "normalization", "add_bias_linear", "add_qkv_bias",
    "gated_linear_unit", "qk_layernorm", "layernorm_zero_centered_gamma", "rotary_interleaved",
    "softmax_scale", "window_size", "multi_latent_attention", "attention_output_gate",
    "mtp_num_layers", "init_method_std", "num_moe_experts", "moe_layer_freq",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
    "moe_router_score_function", "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_router_num_groups", "moe_router_group_topk",
    "moe_expert_capacity_factor", "moe_apply_probs_on_input", "moe_router_load_balancing_type",
    "moe_router_dtype", "moe_aux_loss_coeff", "moe_z_loss_coeff",
)
# Megatron-LM argument names that differ from the TransformerConfig field.
_ARG_NAMES = {
    "layernorm_epsilon": "norm_epsilon",
    "num_moe_experts": "num_experts",
    "layernorm_zero_centered_gamma": "apply_layernorm_1p",
    "gated_linear_unit": "swiglu",
}
# GPTModel arguments build_gpt_model passes on (the rest must stay at GPTModel's default).
_GPT_DEFAULTS = {"rotary_base": 10000, "rotary_percent": 1.0}


# ----------------------------------------------------------------------------------------
# Which model a checkpoint holds
# ----------------------------------------------------------------------------------------


def iteration_path(checkpoint_dir) -> Path:
    """An ``iter_*`` directory, or a checkpoint root -> its newest complete iteration."""
    from polycom_megatron.training import checkpoint

    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / "metadata.json").is_file() or (path / "common.pt").is_file():
        return path
    for root in (path, path / "checkpoints"):
        iteration = checkpoint.latest_iteration(root)
        if iteration is not None:
            found = checkpoint.iteration_dir(root, iteration)
            if not found.is_dir():
                raise FileNotFoundError(f"{found} is missing although {root} names it as latest")
            return found
    raise FileNotFoundError(
        f"{path} is not a Megatron distributed checkpoint: no {checkpoint.TRACKER_FILE} and "
        "no metadata.json; pass a checkpoint root, an iter_* directory, or a train-cpu "
        "--output-dir"
    )


def describe_checkpoint(path: Path) -> Tuple[MegatronModel, Optional[Path]]:
    """(the model, the SentencePiece tokenizer file if known) from a checkpoint's common state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    train_state = common.get("train_state") or {}
    if "megatron_model" in train_state:
        spec = train_state["megatron_model"]
        tokenizer = train_state.get("tokenizer")
        return MegatronModel(**spec), Path(tokenizer) if tokenizer else None
    if "job" in train_state:
        return _from_cpu_job(train_state["job"])
    if common.get("args") is not None:
        return _from_megatron_args(common["args"])
    raise ValueError(
        f"{path} does not say which model it holds: a train-cpu checkpoint stores its job in "
        "train_state['job'] and a Megatron-LM one its args; re-save it with a current "
        "polycom-megatron (train-cpu) or Megatron-LM (pretrain)"
    )


def _from_cpu_job(fields: dict) -> Tuple[MegatronModel, Path]:
    from polycom_megatron.config import PolyComConfig
    from polycom_megatron.training import cpu_train
    from polycom_megatron.training.cpu_job import CpuJob

    known = {f.name for f in dataclasses.fields(CpuJob)}
    fields = {k: v for k, v in fields.items() if k in known}
    if fields.get("polycom") is not None:
        fields["polycom"] = PolyComConfig(**fields["polycom"])
    for name in ("output_dir", "data"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    job = CpuJob(**fields)
    config = cpu_train.transformer_config(job.replace(tp=1, pp=1, ep=1))
    model = MegatronModel(
        transformer={name: getattr(config, name) for name in MODEL_FIELDS},
        polycom=dataclasses.asdict(job.polycom) if job.polycom else None,
        gpt=dict(vocab_size=job.padded_vocab_size, max_sequence_length=job.seq_len),
    )
    return model, job.data_dir / "tokenizer.model"


def _from_megatron_args(args: argparse.Namespace) -> Tuple[MegatronModel, Optional[Path]]:
    from polycom_megatron.config import PolyComConfig

    transformer = {}
    for name in MODEL_FIELDS:
        arg = _ARG_NAMES.get(name, name)
        if hasattr(args, arg):
            transformer[name] = getattr(args, arg)
    if not getattr(args, "group_query_attention", False):
        transformer["num_query_groups"] = None
    polycom = PolyComConfig.from_args(args)
    # --swiglu is refused with PolyCom; --polycom-gated turns the gated unit on instead.
    transformer["gated_linear_unit"] = bool(getattr(polycom, "gated", False))
    gpt = dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=getattr(args, "rotary_base", 10000),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
    )
    if getattr(args, "use_rope_scaling", False):
        gpt["rope_scaling"] = True
    tokenizer = getattr(args, "tokenizer_model", None)
    model = MegatronModel(
        transformer=transformer,
        polycom=dataclasses.asdict(polycom) if polycom else None,
        gpt=gpt,
    )
    return model, Path(tokenizer) if tokenizer else None


# ----------------------------------------------------------------------------------------
# Building the model (inside a gloo process)
# ----------------------------------------------------------------------------------------


def transformer_config(model: MegatronModel, tp: int = 1, pp: int = 1, ep: int = 1):
    """The TransformerConfig of ``model`` at a layout, fp32 on CPU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {k: v for k, v in model.transformer.items() if v is not None or k == "num_query_groups"}
    fields.update(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
    )
    if fields.get("num_moe_experts"):
        # The per-expert loop and the allgather dispatcher: what runs on gloo.
        fields.update(moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
    return TransformerConfig(**fields)


def build_model(model: MegatronModel, config):
    """The GPTModel of this rank's pipeline stage."""
    from megatron.core import parallel_state

    from polycom_megatron.model import build_gpt_model

    gpt = dict(model.gpt)
    for name, default in _GPT_DEFAULTS.items():
        if gpt.pop(name, default) != default:
            raise ValueError(
                f"{name} {model.gpt[name]} is not supported (polycom_megatron builds GPTModel "
                f"with the default {default})"
            )
    return build_gpt_model(
        config,
        model.polycom_config(),
        vocab_size=gpt["vocab_size"],
        max_sequence_length=gpt["max_sequence_length"],
        use_te=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=gpt.get("share_embeddings_and_output_weights", False),
        position_embedding_type=gpt.get("position_embedding_type", "rope"),
    )


def init_layout(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    model_parallel_cuda_manual_seed(seed)


def load_full_state(path: Path, model: MegatronModel) -> dict:
    """On one gloo rank: the checkpoint's weights as a TP=1 state dict."""
    from megatron.core import dist_checkpointing

    init_layout()
    gpt = build_model(model, transformer_config(model))
    load_weights(gpt, path)
    return {k: v.detach().clone() for k, v in gpt.state_dict().items()
            if not k.endswith("_extra_state")}


def load_weights(gpt, path: Path) -> None:
    """Load the model weights of a distributed checkpoint into ``gpt`` at its layout
    (dist_checkpointing reshards); the checkpoint's other entries are not read."""
    from megatron.core import dist_checkpointing

    request = gpt.sharded_state_dict()
    loaded = dist_checkpointing.load(request, str(path))
    # The result also carries the checkpoint's common (non-sharded) entries.
    gpt.load_state_dict({k: loaded[k] for k in request})


def save_weights_tp1(state: dict, model: MegatronModel, path: Path) -> None:
    """On one gloo rank: a TP=1 distributed checkpoint holding just the weights."""
    from megatron.core import dist_checkpointing

    init_layout()
    gpt = build_model(model, transformer_config(model))
    missing, unexpected = gpt.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(gpt.sharded_state_dict(), str(path))


# Megatron's optimizer checkpoint drops a step of 0 (``if step:`` in
# FP32Optimizer.sharded_state_dict) and Adam then cannot load moments without a step, so
# an imported checkpoint starts Adam at step 1 with zero moments: the first update after
# a resume is 0.73x the size of a fresh Adam's first update, later ones are the same.
IMPORTED_ADAM_STEP = 1.0


def fresh_optimizer_state(optimizer) -> None:
    """Create Adam's state for a checkpoint written before any training: zero moments at
    step ``IMPORTED_ADAM_STEP``, so that ``train-cpu --resume`` has a state to load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(IMPORTED_ADAM_STEP))


def rank_env() -> Tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
