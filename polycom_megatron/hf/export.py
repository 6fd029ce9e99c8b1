"""Megatron checkpoint -> transformers model directory (``export-hf``), and back
(``import-hf``).

An exported directory holds ``config.json`` (with ``auto_map``), the weights as safetensors
(sharded past ``max_shard_size``), ``configuration.py`` and ``modeling.py`` copied verbatim
from this package, the tokenizer (the SentencePiece model converted to a transformers
tokenizer, ``tokenizer.json``) and a greedy ``generation_config.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from polycom_megatron.hf import convert, megatron_io
from polycom_megatron.hf.configuration import PolyComGPTConfig
from polycom_megatron.hf.ranks import run_on_ranks

HERE = Path(__file__).parent
REMOTE_CODE = ("configuration.py", "modeling.py")
AUTO_MAP = {
    "AutoConfig": "configuration.PolyComGPTConfig",
    "AutoModel": "modeling.PolyComGPTModel",
    "AutoModelForCausalLM": "modeling.PolyComGPTForCausalLM",
}
# The padding piece of the tokenizers ``polycom-megatron data`` trains.
PAD_PIECE = "<pad>"


@dataclass
class Exported:
    output_dir: Path
    checkpoint: Path
    description: str
    num_parameters: int
    tokenizer: bool


def _check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{path} exists and is not empty; choose a new directory or pass --overwrite"
            )
        if not (path / "config.json").is_file():
            raise FileExistsError(
                f"{path} holds files that are not an exported model (no config.json); "
                "refusing to overwrite it"
            )
        shutil.rmtree(path)


def export(
    checkpoint_dir,
    output_dir,
    tokenizer: Optional[Path] = None,
    with_tokenizer: bool = True,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Exported:
    """Write the transformers directory of the newest checkpoint under ``checkpoint_dir``."""
    output_dir = Path(output_dir)
    path = megatron_io.iteration_path(checkpoint_dir)
    model, found_tokenizer = megatron_io.describe_checkpoint(path)
    tokenizer = Path(tokenizer) if tokenizer else found_tokenizer
    if with_tokenizer and (tokenizer is None or not tokenizer.is_file()):
        raise FileNotFoundError(
            f"no SentencePiece tokenizer for {path} (looked for {tokenizer}); pass "
            "--tokenizer PATH/tokenizer.model, or --no-tokenizer to export the weights alone"
        )
    hf = hf_config(model)
    tok = load_tokenizer(tokenizer, hf) if with_tokenizer else None
    _check_output_dir(output_dir, overwrite)
    state = run_on_ranks(megatron_io.load_full_state, 1, path, model)
    weights = convert.megatron_to_hf(state, hf)
    write_model_dir(weights, hf, output_dir, max_shard_size)
    if tok is not None:
        tok.save_pretrained(output_dir)
        # The SentencePiece model itself too: for sentencepiece users and re-imports.
        shutil.copyfile(tokenizer, output_dir / "tokenizer.model")
    return Exported(output_dir, path, convert.describe(hf),
                    sum(t.numel() for t in weights.values()), with_tokenizer)


def hf_config(model: convert.MegatronModel) -> PolyComGPTConfig:
    config = megatron_io.transformer_config(model)
    fields = convert.hf_config_dict(config, model.polycom_config() if model.polycom else None,
                                    model.gpt)
    return PolyComGPTConfig(**fields)


def write_model_dir(weights: dict, hf: PolyComGPTConfig, output_dir: Path,
                    max_shard_size: str = "2GB") -> None:
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from polycom_megatron.hf.modeling import PolyComGPTForCausalLM

    hf_logging.disable_progress_bar()
    hf.auto_map = dict(AUTO_MAP)
    hf.architectures = ["PolyComGPTForCausalLM"]
    hf.tokenizer_class = "LlamaTokenizer"
    with torch.device("meta"):
        model = PolyComGPTForCausalLM(hf)
    model.load_state_dict(weights, strict=False, assign=True)
    if hf.tie_word_embeddings:
        model.tie_weights()
    meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if meta:
        raise ValueError(f"exported weights lack {meta[:5]}")
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size, safe_serialization=True)
    for name in REMOTE_CODE:
        shutil.copyfile(HERE / name, output_dir / name)


def load_tokenizer(model_file: Path, hf: PolyComGPTConfig):
    """The SentencePiece model as a transformers (tokenizers-backed) Llama tokenizer: no
    BOS added (our datasets have none), EOS and PAD from the model's own pieces. Sets the
    special-token ids of ``hf``. Converting needs sentencepiece and protobuf; loading the
    result needs only transformers."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    pieces = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    if pieces > hf.vocab_size:
        raise ValueError(
            f"the tokenizer {model_file} has {pieces} pieces, more than the model's "
            f"vocabulary ({hf.vocab_size}); pass the tokenizer the model was trained with"
        )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, legacy=False, add_bos_token=False, add_eos_token=False, pad_token=PAD_PIECE
        )
    hf.bos_token_id = tokenizer.bos_token_id
    hf.eos_token_id = tokenizer.eos_token_id
    hf.pad_token_id = tokenizer.pad_token_id
    return tokenizer


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------


@dataclass
class Imported:
    checkpoint: Path
    description: str
    layout: str
    train_cpu_flags: Optional[list]


def import_hf(hf_dir, checkpoint_root, tp: int = 1, pp: int = 1, ep: int = 1,
              overwrite: bool = False) -> Imported:
    """A transformers directory written by ``export-hf`` -> a Megatron distributed
    checkpoint at TP x PP x EP (``world = TP x PP x EP`` gloo ranks, EP over data
    parallelism) with a fresh optimizer, at iteration 0, under ``checkpoint_root``."""
    from safetensors.torch import load_file

    from polycom_megatron.training import checkpoint

    hf_dir, checkpoint_root = Path(hf_dir), Path(checkpoint_root)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a transformers model directory")
    hf = PolyComGPTConfig.from_pretrained(hf_dir)
    if getattr(hf, "model_type", None) != PolyComGPTConfig.model_type:
        raise ValueError(f"{hf_dir} holds a {hf.model_type!r} model, not polycom_gpt")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    model = convert.megatron_model(hf)
    _check_layout(hf, tp, pp, ep)
    if checkpoint.latest_iteration(checkpoint_root) is not None and not overwrite:
        raise FileExistsError(
            f"{checkpoint_root} already holds a checkpoint; choose a new directory or pass "
            "--overwrite"
        )
    state = convert.hf_to_megatron(weights, hf)
    tokenizer = hf_dir / "tokenizer.model"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "tp1"
        run_on_ranks(megatron_io.save_weights_tp1, 1, state, model, staged)
        flags = train_cpu_flags(hf, tp, pp, ep)
        train_state = dict(
            megatron_model=dataclasses.asdict(model),
            imported_from=str(hf_dir.resolve()),
            tokenizer=str(tokenizer) if tokenizer.is_file() else None,
        )
        fingerprint = _fingerprint(flags, hf, tokenizer if tokenizer.is_file() else None,
                                   tp, pp, ep)
        path = run_on_ranks(_save_at_layout, tp * pp * ep, model, staged, checkpoint_root,
                            tp, pp, ep, train_state, fingerprint)
    return Imported(Path(path), convert.describe(hf),
                    f"TP {tp} x PP {pp} x EP {ep} ({tp * pp * ep} ranks)", flags)


def _check_layout(hf, tp: int, pp: int, ep: int) -> None:
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if tp * pp * ep > 4:
        raise ValueError(f"TP x PP x EP = {tp * pp * ep} ranks; the CPU import runs at most 4")
    if hf.num_attention_heads % tp or hf.num_key_value_heads % tp:
        raise ValueError(f"--tp {tp} must divide the attention heads ({hf.num_attention_heads}) "
                         f"and key/value heads ({hf.num_key_value_heads})")
    if hf.vocab_size % tp or hf.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide the vocabulary ({hf.vocab_size}) and the FFN "
                         f"width ({hf.intermediate_size})")
    if hf.num_hidden_layers % pp:
        raise ValueError(f"--pp {pp} must divide the number of layers ({hf.num_hidden_layers})")
    if ep > 1 and (not hf.num_experts or hf.num_experts % ep):
        raise ValueError(f"--ep {ep} needs a number of experts divisible by it "
                         f"(the model has {hf.num_experts})")


def train_cpu_flags(hf, tp: int, pp: int, ep: int) -> Optional[list]:
    """The ``train-cpu`` flags that rebuild this model at this layout, or None where
    train-cpu cannot express it (GQA, shared experts, dense layers between MoE ones, ...)."""
    moe = bool(hf.num_experts)
    expressible = (
        hf.num_key_value_heads == hf.num_attention_heads
        and not hf.tie_word_embeddings and not hf.attention_bias and not hf.mlp_bias
        and hf.rms_norm_eps == 1e-5 and hf.rope_theta == 10000 and hf.rotary_percent == 1.0
        and (not moe or (all(hf.moe_layers) and not hf.moe_shared_expert_intermediate_size
                         and hf.moe_router_score_function == "softmax"
                         and not hf.moe_router_pre_softmax and not hf.moe_router_enable_expert_bias
                         and hf.moe_intermediate_size == hf.intermediate_size))
    )
    if not expressible:
        return None
    flags = [
        "--world-size", str(tp * pp * ep), "--tp", str(tp), "--pp", str(pp),
        "--layers", str(hf.num_hidden_layers), "--hidden", str(hf.hidden_size),
        "--heads", str(hf.num_attention_heads), "--ffn-hidden", str(hf.intermediate_size),
        "--polycom-activation", hf.polycom_activation, "--polycom-order", str(hf.polycom_order),
        "--polycom-eps", str(hf.polycom_eps), "--num-experts", str(hf.num_experts or 0),
    ]
    flags += ["--polycom-gated"] if hf.polycom_gated else []
    flags += [] if hf.polycom_bias else ["--polycom-no-bias"]
    if moe:
        flags += ["--ep", str(ep), "--moe-top-k", str(hf.moe_router_topk),
                  "--polycom-coeff-mode", hf.polycom_coeff_mode]
    return flags


def _fingerprint(flags: Optional[list], hf, tokenizer: Optional[Path], tp: int, pp: int,
                 ep: int) -> dict:
    """What the checkpoint's manifest records: the fingerprint of the train-cpu run that
    ``flags`` (and the tokenizer's vocabulary) describe, so that its ``--resume`` verifies
    it like one of its own; without such flags, the layout alone (train-cpu then names
    every flag that differs)."""
    from polycom_megatron.training import cpu_resume
    from polycom_megatron.training.cpu_job import build_parser, job_from_args

    if flags is None:
        layout = dict(world_size=tp * pp * ep, tp=tp, pp=pp, ep=ep)
        return dict(model=dict(architecture="gpt"), layout=layout, versions={})
    vocab = hf.vocab_size
    if tokenizer is not None:
        import sentencepiece

        vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    args = build_parser().parse_args(
        flags + ["--output-dir", "unused", "--vocab-size", str(vocab)])
    found = cpu_resume.fingerprint(job_from_args(args, experts_available=True))
    found.pop("data")  # trained elsewhere: any --split may continue it
    return found


def _save_at_layout(model, staged, root, tp, pp, ep, train_state, fingerprint):
    """On TP x PP x EP ranks: load the staged weights, save a resumable checkpoint."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from polycom_megatron.training import checkpoint, cpu_train
    from polycom_megatron.training.cpu_job import CpuJob

    megatron_io.init_layout(tp, pp, ep)
    config = megatron_io.transformer_config(model, tp, pp, ep)
    gpt = megatron_io.build_model(model, config)
    megatron_io.load_weights(gpt, staged)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt
    )
    # train-cpu's optimizer and schedule at its defaults: a resumed run keeps both (Adam's
    # hyperparameters and the LR schedule come from the checkpoint, as in Megatron).
    defaults = CpuJob()
    optimizer = get_megatron_optimizer(cpu_train._optimizer_config(defaults), [ddp])
    megatron_io.fresh_optimizer_state(optimizer)
    scheduler = cpu_train._scheduler(defaults, optimizer)
    path = checkpoint.save_checkpoint(root, 0, gpt, optimizer, scheduler, train_state,
                                      fingerprint=fingerprint)
    parallel_state.destroy_model_parallel()
    return str(path)
