"""``polycom-megatron pretrain``: Megatron-LM's own training loop on a PolyCom GPT.

A drop-in for Megatron-LM's ``pretrain_gpt.py``: it takes every argument that script takes,
plus the ``--polycom-*`` flags (``polycom_megatron.config``), and runs
``megatron.training.pretrain`` with

* a model provider that builds the GPT from our spec builders (local or Transformer Engine
  per ``--transformer-impl``; dense or MoE; one pipeline stage / virtual stage per call);
  ``--polycom-activation none`` builds Megatron's stock MLP, the baseline;
* a GPT dataset provider on megatron-core's ``BlendedMegatronDatasetBuilder``;
* a forward step and loss function like pretrain_gpt's (shared with the CPU loop,
  see ``common.py``).

Before Megatron parses anything it refuses ``--swiglu`` with PolyCom (PolyCom replaces
the gated unit) and turns bias-activation fusion off (it only fuses Megatron's built-in
activations). Megatron-LM features this launcher does not build (``--spec``, MTP,
legacy models, packed SFT batches, ...) are refused by name instead of silently ignored.

``megatron.training`` comes with Megatron-LM: in the megatron-core wheel from 0.17 on
(Python >= 3.12), or from a Megatron-LM checkout on PYTHONPATH. The API differences
between 0.15 and 0.19 are confined to the small ``_megatron_*`` functions at the end.

Usage: ``torchrun --nproc-per-node 8 -m polycom_megatron.training.pretrain <pretrain_gpt.py
arguments> --polycom-activation polynorm``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from collections import Counter
from functools import partial
from typing import List, Optional, Sequence, Tuple

from polycom_megatron.config import (
    PolyComConfig,
    add_polycom_args,
    gated_unit_conflict,
    set_transformer_config,
)

# As Megatron-LM's pretrain_gpt.py: the tokenizer type when --tokenizer-type is not given.
ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}

# Flags whose bias-activation fusion would bypass the PolyCom activation.
NO_FUSION_FLAGS = ("--no-bias-gelu-fusion", "--no-bias-swiglu-fusion")

# Flags that turn the MLP into a gated linear unit, which PolyCom replaces.
GLU_FLAGS = ("--swiglu", "--quick-geglu")

MISSING_MEGATRON_TRAINING = """\
error: `polycom-megatron pretrain` runs Megatron-LM's training loop (megatron.training),
which is not importable here: {reason}

Get it in one of two ways:
  * Python >= 3.12 and megatron-core >= 0.17, whose wheel includes megatron.training:
      pip install 'megatron-core>=0.17,<0.20'
  * a Megatron-LM checkout (release core_v0.15.0 or later) on PYTHONPATH:
      git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM
      PYTHONPATH=$PWD/Megatron-LM polycom-megatron pretrain ...

No GPU? `polycom-megatron train-cpu` trains a small PolyCom model with megatron-core alone."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, on_cpu = split_launcher_args(argv)
        megatron_argv, polycom = prepare_argv(argv)
        if on_cpu:
            megatron_argv = cpu_argv(megatron_argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import megatron.training  # noqa: F401
    except ImportError as exc:
        print(MISSING_MEGATRON_TRAINING.format(reason=exc), file=sys.stderr)
        return 2

    from polycom_megatron.patching import polycom_help

    # Before Megatron's in-process-restart wrapper, which answers --help without our flags.
    polycom_help(lambda parser: add_launcher_args(add_polycom_args(parser)), megatron_argv)
    if on_cpu:
        from polycom_megatron import cpu

        cpu.init_process_group()
        cpu.enable_megatron_training()
    try:
        _run_megatron_pretrain(megatron_argv)
    except UnsupportedSettings as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The launcher's own options (Megatron never sees them)."""
    group = parser.add_argument_group(title="polycom-megatron pretrain")
    group.add_argument(
        "--cpu",
        action="store_true",
        help="Run Megatron-LM's training loop on the CPU with gloo ranks (torchrun "
        "--nproc-per-node N for N ranks), to debug a configuration without a GPU. Adds "
        + " ".join(" ".join(flag) for flag in CPU_FLAGS) + " where missing.",
    )
    return parser


def split_launcher_args(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """(the arguments without the launcher's own options, whether --cpu was given)."""
    known, _ = add_launcher_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return [arg for arg in argv if arg != "--cpu"], known.cpu


# What Megatron-LM needs to start without CUDA: no Transformer Engine, no fused CUDA
# kernels, weights initialised on the CPU, gloo.
CPU_FLAGS = (
    ("--transformer-impl", "local"),
    ("--distributed-backend", "gloo"),
    ("--use-cpu-initialization",),
    ("--no-gradient-accumulation-fusion",),
    ("--no-masked-softmax-fusion",),
    ("--no-rope-fusion",),
    ("--no-persist-layer-norm",),
)


def cpu_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` completed with ``CPU_FLAGS``; a contradicting value is refused."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, *value in CPU_FLAGS:
        parser.add_argument(flag, **({} if value else {"action": "store_true"}))
    given, _ = parser.parse_known_args(list(argv))
    added = []
    for flag, *value in CPU_FLAGS:
        current = getattr(given, flag[2:].replace("-", "_"))
        if not value:
            added += [] if current else [flag]
        elif current is None:
            added += [flag, value[0]]
        elif current != value[0]:
            raise ValueError(
                f"--cpu runs without CUDA and needs {flag} {value[0]}, not {current}: "
                f"drop {flag} or --cpu."
            )
    if added:
        print(f"note: --cpu: added {' '.join(added)}", flush=True)
    return list(argv) + added


def prepare_argv(argv: Sequence[str]) -> Tuple[List[str], Optional[PolyComConfig]]:
    """Check the PolyCom flags before Megatron starts; return the argument list Megatron
    should parse (with bias-activation fusion off under PolyCom) and the PolyCom config."""
    if "-h" in argv or "--help" in argv:
        return list(argv), None  # Megatron prints the help, our group included
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_polycom_args(parser)
    for flag in GLU_FLAGS:
        parser.add_argument(flag, action="store_true")
    known, _ = parser.parse_known_args(list(argv))
    polycom = PolyComConfig.from_args(known)  # raises ValueError on a bad order/eps
    if polycom is None:
        return list(argv), None
    glu = [flag for flag in GLU_FLAGS if getattr(known, flag[2:].replace("-", "_"))]
    if glu:
        raise ValueError(gated_unit_conflict(glu[0], polycom.activation, gated=polycom.gated))
    missing = [flag for flag in NO_FUSION_FLAGS if flag not in argv]
    if missing:
        print(
            f"note: --polycom-activation {polycom.name}: bias-activation fusion is off "
            f"({' '.join(NO_FUSION_FLAGS)}): it only fuses Megatron's built-in activations.",
            flush=True,
        )
    return list(argv) + missing, polycom


# Megatron-LM settings this launcher does not build, with what to do instead. Checked on
# the parsed arguments; getattr defaults cover releases that lack a flag.
_UNSUPPORTED = (
    ("use_legacy_models", False, "--use-legacy-models: only Megatron-Core models are built"),
    ("spec", None, "--spec: the launcher builds the layer spec itself (polycom_megatron.specs)"),
    ("yaml_cfg", None, "--yaml-cfg: pass the model settings as flags"),
    ("heterogeneous_layers_config_path", None, "--heterogeneous-layers-config-path"),
    ("experimental_attention_variant", None, "--experimental-attention-variant"),
    ("mtp_num_layers", None, "--mtp-num-layers (multi-token prediction)"),
    ("qk_l2_norm", False, "--qk-l2-norm"),
    ("sft", False, "--sft (packed SFT batches): use Megatron-LM's pretrain_gpt.py"),
    ("fim_data", False, "--fim-data: use Megatron-LM's pretrain_gpt.py"),
    ("hybrid_context_parallel", False, "--hybrid-context-parallel"),
    ("dataloader_inter_document_masking", False, "--dataloader-inter-document-masking"),
    # polycom_megatron.model.build_gpt_model does not forward these to GPTModel yet.
    ("rotary_percent", 1.0, "--rotary-percent other than 1.0"),
    ("rotary_base", 10000, "--rotary-base other than 10000"),
    ("use_rope_scaling", False, "--use-rope-scaling"),
    ("fp16_lm_cross_entropy", False, "--fp16-lm-cross-entropy"),
)


def unsupported_settings(args: argparse.Namespace) -> List[str]:
    """The parsed Megatron settings this launcher cannot honour (empty when all is fine)."""
    found = []
    for name, default, what in _UNSUPPORTED:
        value = getattr(args, name, default)
        if value != default and not (default is False and value is None):
            found.append(what)
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if impl not in ("local", "transformer_engine"):
        found.append(f"--transformer-impl {impl}: use local or transformer_engine")
    return found


class UnsupportedSettings(ValueError):
    """Megatron-LM flags this launcher cannot honour."""


def check_args(args: argparse.Namespace) -> None:
    found = unsupported_settings(args)
    if found:
        raise UnsupportedSettings(
            "polycom-megatron pretrain does not support: " + "; ".join(found)
            + ". Remove these flags (or train the stock model with Megatron-LM's pretrain_gpt.py)."
        )


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def model_from_args(args, config, pre_process=True, post_process=True, vp_stage=None):
    """The GPT for one (virtual) pipeline stage, from Megatron's parsed arguments and the
    TransformerConfig built from them."""
    from polycom_megatron.model import build_gpt_model

    check_args(args)
    polycom = PolyComConfig.from_args(args)
    if polycom is not None:
        # --polycom-gated turns on Megatron's gated linear unit (fc1 as [gate, up]); the
        # non-gated form has it off (--swiglu was refused before Megatron started).
        set_transformer_config(config, polycom)
    return build_gpt_model(
        config,
        polycom,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        use_te=args.transformer_impl == "transformer_engine",
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron's model-provider hook. ``pg_collection`` (0.16+) is Megatron's default
    process groups during pretraining, the ones our modules read from parallel_state."""
    from megatron.training import get_args, print_rank_0

    args = get_args()
    print_rank_0("building GPT model (polycom_megatron) ...")
    if config is None:
        config = _megatron_transformer_config(args)
    model = model_from_args(args, config, pre_process, post_process, vp_stage)
    print_rank_0(f"> decoder MLPs: {describe_mlps(model)}")
    return model


def describe_mlps(model) -> str:
    """The decoder layers' MLP classes (with the experts class for MoE layers), counted,
    so that a training log says which activation trained."""
    names = []
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        inner = f"[{type(experts).__name__}]" if experts is not None else ""
        names.append(type(layer.mlp).__name__ + inner)
    return ", ".join(f"{count} x {name}" for name, count in Counter(names).items())


# --------------------------------------------------------------------------------------
# Data and forward step
# --------------------------------------------------------------------------------------


def dataset_config_from_args(args, tokenizer):
    """GPTDatasetConfig from Megatron's arguments, field by field as pretrain_gpt.py."""
    from megatron.training.utils import get_blend_and_blend_per_split

    from polycom_megatron.training import common

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None):
        with open(args.per_dataset_sequences_path) as stream:
            sequences_per_dataset = json.load(stream)
    optional = dict(
        multiple_validation_sets=getattr(args, "multiple_validation_sets", None),
        full_validation=getattr(args, "full_validation", None),
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", None),
        mmap_bin_files=getattr(args, "mmap_bin_files", None),
        object_storage_cache_path=getattr(args, "object_storage_cache_path", None),
        mid_level_dataset_surplus=getattr(args, "mid_level_dataset_surplus", None),
        allow_ambiguous_pad_tokens=getattr(args, "allow_ambiguous_pad_tokens", None),
        fast_cache_load=getattr(args, "dataloader_fast_cache_load", None),
        defer_npy_index_mmap=getattr(args, "dataloader_defer_npy_index_mmap", None),
        sequences_per_dataset=sequences_per_dataset,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=getattr(args, "data_parallel_size", None),
        sequence_parallel_size=args.tensor_model_parallel_size * int(args.sequence_parallel),
    )
    return common.gpt_dataset_config(
        seed=args.seed,
        seq_length=args.seq_length,
        tokenizer=tokenizer,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        **optional,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's dataset-provider hook: GPT (or mock) train/valid/test datasets."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    from polycom_megatron.training import common

    args = get_args()
    check_args(args)
    config = dataset_config_from_args(args, _megatron_dataset_tokenizer(args))
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = common.build_gpt_datasets(
        config,
        train_val_test_num_samples,
        MockGPTDataset if args.mock_data else GPTDataset,
        partial(common.is_dataset_built_on_rank, vp_stage=vp_stage),
    )
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


# Megatron builds its data loaders on every rank and lets the provider decide who reads.
train_valid_test_datasets_provider.is_distributed = True


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron's forward-step hook: this stage's batch, the model, the loss function."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    from polycom_megatron.training import common

    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    shape = common.BatchShape(
        args.micro_batch_size, args.seq_length, args.create_attention_mask_in_dataloader
    )
    batch = _megatron_context_parallel_slice(common.get_batch(data_iterator, shape, vp_stage))
    timers("batch-generator").stop()
    return common.gpt_forward(
        model,
        batch,
        check_for_nan=getattr(args, "check_for_nan_in_loss_and_grad", False),
        check_for_spiky_loss=getattr(args, "check_for_spiky_loss", False),
        return_schedule_plan=return_schedule_plan,
    )


# --------------------------------------------------------------------------------------
# megatron.training API differences, 0.15 to 0.19
# --------------------------------------------------------------------------------------


def _run_megatron_pretrain(megatron_argv: List[str]) -> None:
    """Call ``megatron.training.pretrain`` the way this release wants it.

    0.15-0.17: ``pretrain(dataset_provider, model_provider, model_type, forward_step,
    extra_args_provider=, args_defaults=)`` parses the arguments itself.
    0.18: the caller parses (``parse_and_validate_args``) and passes a config container
    first: ``pretrain(cfg, dataset_provider, model_provider, model_type, forward_step)``.
    0.19: same, but ``model_provider`` became a keyword after ``forward_step_func`` (the
    model otherwise comes from ``cfg.model``, which we leave empty).
    Keywords for everything after the container cover both orders.
    """
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain

    takes_container = "cfg_container" in inspect.signature(pretrain).parameters
    saved_argv = sys.argv
    # Megatron's parsers (and the in-process-restart wrapper) read sys.argv.
    sys.argv = [saved_argv[0] if saved_argv else "pretrain"] + megatron_argv
    try:
        run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
        hooks = dict(
            train_valid_test_dataset_provider=train_valid_test_datasets_provider,
            model_provider=model_provider,
            model_type=ModelType.encoder_or_decoder,
            forward_step_func=forward_step,
            store=store,
        )
        if takes_container:
            run(_megatron_config_container(), **hooks)
        else:
            # pretrain() parses again itself; parsing here first (argparse only, nothing
            # initialised) refuses unsupported flags before any process group exists.
            from megatron.training.arguments import parse_args

            check_args(parse_args(extra_args_provider=add_polycom_args))
            run(extra_args_provider=add_polycom_args, args_defaults=ARGS_DEFAULTS, **hooks)
    finally:
        sys.argv = saved_argv


def _megatron_config_container():
    """0.18+: parse and validate the arguments, then wrap them in a PretrainConfigContainer
    without a model config, so that ``pretrain`` calls our model provider."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(
        extra_args_provider=add_polycom_args, args_defaults=ARGS_DEFAULTS
    )
    check_args(args)
    with warnings.catch_warnings():
        # It recommends a ModelConfig over a provider; the provider is what we bring.
        warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
        return pretrain_cfg_container_from_args(args)


def _megatron_transformer_config(args):
    # megatron.training.arguments in every release (0.18 moved the body to
    # argument_utils and re-exports it).
    from megatron.training.arguments import core_transformer_config_from_args

    return core_transformer_config_from_args(args)


def _megatron_dataset_tokenizer(args):
    """The tokenizer GPTDataset reads EOD/pad ids from, as pretrain_gpt.py picks it."""
    if getattr(args, "legacy_tokenizer", False):  # 0.15-0.16 only
        from megatron.training import get_tokenizer

        return get_tokenizer()
    try:  # 0.17+
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    except ImportError:  # 0.15-0.16
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
    return build_tokenizer(args)


def _megatron_context_parallel_slice(batch):
    """This CP rank's share of the sequence (a no-op without context parallelism).

    ``get_batch_on_this_cp_rank`` takes (batch) up to 0.17 and (batch, is_hybrid_cp,
    cp_group, ...) from 0.18."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    present = {key: value for key, value in batch.items() if value is not None}
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        present = get_batch_on_this_cp_rank(
            present, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
    else:
        present = get_batch_on_this_cp_rank(present)
    return {**batch, **present}


if __name__ == "__main__":
    sys.exit(main())
