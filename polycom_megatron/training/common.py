"""What the Megatron launcher (``pretrain.py``) and the CPU loop (``cpu_loop.py``) share:
the GPT dataset config and builder, the batch a pipeline stage needs (read on one
tensor-parallel rank, broadcast to the others), the forward step and the loss.

Nothing here imports ``megatron.training``, so the CPU loop runs on a bare
megatron-core install; the launcher adds only what reads Megatron's parsed arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

# The order of a batch's tensors on the wire when one TP rank broadcasts it to the others.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
_FIRST_STAGE_KEYS = ("tokens", "position_ids", "attention_mask")
_LAST_STAGE_KEYS = ("labels", "loss_mask", "attention_mask")

# A loss this many times larger than the largest seen so far is reported as a spike
# (the same threshold as Megatron-LM's pretrain_gpt.py).
SPIKY_LOSS_FACTOR = 10


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def gpt_dataset_config(
    *,
    seed: int,
    seq_length: int,
    tokenizer,
    blend=None,
    blend_per_split=None,
    split: Optional[str] = None,
    path_to_cache: Optional[str] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    **optional,
) -> GPTDatasetConfig:
    """A ``GPTDatasetConfig``. ``optional`` holds fields that only some megatron-core
    releases have (e.g. ``allow_ambiguous_pad_tokens``, ``data_parallel_size``); those this
    release lacks, and those left at None, are dropped so one call works on 0.15 to 0.19."""
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    extra = {k: v for k, v in optional.items() if k in known and v is not None}
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **extra,
    )


def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    """Datasets are read by TP rank 0 of the stages that consume data (first: tokens,
    last: labels); ``get_batch`` hands the batch on to the other TP ranks."""
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return _is_first_stage(vp_stage) or _is_last_stage(vp_stage)


def build_gpt_datasets(
    config: GPTDatasetConfig,
    num_samples: Sequence[Optional[int]],
    dataset_class=GPTDataset,
    is_built_on_rank: Callable[[], bool] = is_dataset_built_on_rank,
) -> List[Optional[GPTDataset]]:
    """Train/valid/test datasets through megatron-core's builder (call on every rank:
    rank 0 writes the index caches first, the others then read them)."""
    return BlendedMegatronDatasetBuilder(
        dataset_class, list(num_samples), is_built_on_rank, config
    ).build()


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShape:
    """What every TP rank must know to receive a batch it did not read itself."""

    micro_batch_size: int
    seq_length: int
    with_attention_mask: bool


def get_batch(
    data_iterator: Optional[Iterator[Dict[str, torch.Tensor]]],
    shape: BatchShape,
    vp_stage: Optional[int] = None,
) -> Dict[str, Optional[torch.Tensor]]:
    """This pipeline stage's micro-batch: TP rank 0 draws it from ``data_iterator`` (the
    other ranks may pass None) and broadcasts the tensors this stage uses over the TP
    group; the rest are None. Middle stages use none of them."""
    first, last = _is_first_stage(vp_stage), _is_last_stage(vp_stage)
    batch: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(BATCH_KEYS)
    if not (first or last):
        return batch
    wanted = set(_FIRST_STAGE_KEYS if first else ()) | set(_LAST_STAGE_KEYS if last else ())
    if not shape.with_attention_mask:
        wanted.discard("attention_mask")

    device = _device()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    reader = parallel_state.get_tensor_model_parallel_rank() == 0
    if reader:
        if data_iterator is None:
            raise RuntimeError(
                "TP rank 0 of a first/last pipeline stage has no data iterator; build the "
                "datasets with is_dataset_built_on_rank"
            )
        sample = next(data_iterator)
        missing = wanted - set(sample)
        if missing:
            raise KeyError(
                f"the dataset's batches lack {sorted(missing)}; with an attention mask expected, "
                "build the dataset with create_attention_mask=True"
            )
    src = parallel_state.get_tensor_model_parallel_src_rank()
    for key in BATCH_KEYS:  # fixed order: every rank issues the same broadcasts
        if key not in wanted:
            continue
        if reader:
            tensor = sample[key].to(device, non_blocking=True)
        else:
            tensor = torch.empty(_wire_shape(key, shape), dtype=_wire_dtype(key), device=device)
        if tp_size > 1:
            dist.broadcast(tensor, src, group=tp_group)
        batch[key] = tensor
    return batch


def _wire_shape(key: str, shape: BatchShape):
    b, s = shape.micro_batch_size, shape.seq_length
    return (b, 1, s, s) if key == "attention_mask" else (b, s)


def _wire_dtype(key: str) -> torch.dtype:
    # As GPTDataset produces them: int64 ids, float32 loss mask, bool attention mask.
    return {"loss_mask": torch.float32, "attention_mask": torch.bool}.get(key, torch.int64)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu")
    )


def _is_first_stage(vp_stage: Optional[int]) -> bool:
    return parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def _is_last_stage(vp_stage: Optional[int]) -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


# --------------------------------------------------------------------------------------
# Loss and forward step
# --------------------------------------------------------------------------------------


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    check_for_nan: bool = False,
    check_for_spiky_loss: bool = False,
):
    """Masked LM loss in the form Megatron's schedules take: (sum of token losses,
    number of tokens, {"lm loss": [sum, tokens]}). The schedule divides by the token count
    (unless per-token loss is on) and by the number of micro-batches."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    if check_for_nan or check_for_spiky_loss:
        _validate_loss(loss, check_for_nan, check_for_spiky_loss)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.view(1).to(loss.dtype)])
    return loss, num_tokens, {"lm loss": report}


def _validate_loss(loss: torch.Tensor, check_for_nan: bool, check_for_spiky_loss: bool) -> None:
    # Megatron's rerun state machine decides whether a bad loss is a hardware fault
    # (re-runs the step) or real; it is a no-op unless the training loop enabled it.
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    if check_for_nan:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(
                result=loss,
                rejection_func=reject,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,  # the forward pass is deterministic
                fatal=True,
            )
    if check_for_spiky_loss:
        machine.validate_result(
            result=loss,
            rejection_func=partial(
                machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"
            ),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )


def gpt_forward(
    model,
    batch: Dict[str, Optional[torch.Tensor]],
    check_for_nan: bool = False,
    check_for_spiky_loss: bool = False,
    return_schedule_plan: bool = False,
):
    """The body of a Megatron forward step: run the model on ``batch`` and return
    (output, loss function) as ``get_forward_backward_func()`` expects."""
    loss = partial(
        loss_func,
        batch["loss_mask"],
        check_for_nan=check_for_nan,
        check_for_spiky_loss=check_for_spiky_loss,
    )
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    if return_schedule_plan:
        # Megatron asks for this only with --overlap-moe-expert-parallel-comm.
        plan = model.build_schedule_plan(
            *inputs, labels=batch["labels"], loss_mask=batch["loss_mask"]
        )
        return plan, loss
    output = model(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, loss
