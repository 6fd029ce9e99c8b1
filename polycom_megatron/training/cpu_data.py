"""The CPU job's data: the training and validation splits of the prepared corpus as
megatron-core GPTDatasets, and the micro-batches each rank draws from them.

The split is Megatron-LM's ``--split`` (train, valid, test shares of the documents, in
corpus order), so validation documents are never trained on. The validation split is
shuffled with a fixed seed, not the run's ``--seed``: every evaluation of every run on the
same data, split and sequence length reads the same sequences, whatever the activation or
the seed, so their validation losses compare directly.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from polycom_megatron.data import DEFAULT_DATASET_NAME
from polycom_megatron.training import common
from polycom_megatron.training.cpu_job import CpuJob

# The attention mask comes from the dataset rather than being built inside attention:
# Megatron's default causal-mask helper allocates on CUDA.
WITH_ATTENTION_MASK = True
# Shuffles the validation split's documents and sequences (see the module docstring).
VALIDATION_SEED = 1234
TRAIN, VALID = 0, 1  # megatron.core.datasets.utils.Split order


def train_dataset(job: CpuJob):
    """One epoch of the training split as a GPTDataset (None on ranks that read no data).

    Its length does not depend on --steps, so a run cut short and resumed sees exactly
    the samples of a run that went straight through; epochs repeat via ``micro_batches``.
    """
    dataset = _split_dataset(job, TRAIN, job.seed)
    if dataset is not None and len(dataset) < job.global_batch:
        raise ValueError(
            f"the training split yields only {len(dataset)} sequences of {job.seq_len} tokens, "
            f"fewer than one global batch ({job.global_batch}); lower --seq-len or "
            "--global-batch, or give training a larger share of --split"
        )
    return dataset


def validation_dataset(job: CpuJob):
    """One epoch of the validation split (None without evaluation or on ranks that read
    no data); it must hold ``--eval-iters`` global batches."""
    if not job.eval_iters:
        return None
    dataset = _split_dataset(job, VALID, VALIDATION_SEED)
    needed = job.eval_iters * job.global_batch
    if dataset is not None and len(dataset) < needed:
        raise ValueError(
            f"the validation split (--split {job.split}) yields only {len(dataset)} sequences "
            f"of {job.seq_len} tokens, fewer than --eval-iters x --global-batch = {needed}; "
            "lower --eval-iters or give validation a larger share of --split"
        )
    return dataset


def _split_dataset(job: CpuJob, which: int, seed: int):
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(job.data_dir / "tokenizer.model"),
        metadata_path={"library": "sentencepiece"},
    )
    config = common.gpt_dataset_config(
        seed=seed,
        seq_length=job.seq_len,
        tokenizer=tokenizer,
        blend=([str(job.data_dir / DEFAULT_DATASET_NAME)], None),
        split=job.split,
        # In the run, not the data directory: that may be shared, read-only, or the user's.
        path_to_cache=str(job.output_dir / "index-cache"),
        create_attention_mask=WITH_ATTENTION_MASK,
    )
    # Megatron's split matrix (document book-ends per split) decides which documents each
    # split holds; only the wanted split is built, with its own seed.
    config.split_matrix = [
        bounds if i == which else None for i, bounds in enumerate(config.split_matrix)
    ]
    if config.split_matrix[which] is None:
        return None
    datasets = common.build_gpt_datasets(config, [None, None, None])
    return datasets[which]


def micro_batches(job: CpuJob, dataset, first_iteration: int) -> Optional[Iterator[dict]]:
    """This rank's training micro-batches from ``first_iteration`` on, as Megatron's
    pretraining sampler lays them out: each step takes the next ``global_batch`` samples;
    every micro-batch round takes ``micro_batch x DP`` of them and DP rank r gets the r-th
    slice. Each pass over the data uses a fresh permutation seeded by (seed, epoch)."""
    if dataset is None:
        return None
    n = len(dataset)

    def sample_id(position: int) -> int:
        epoch, offset = divmod(position, n)
        return int(_epoch_order(job.seed, epoch, n)[offset])

    return _batches(job, dataset, first_iteration * job.global_batch, sample_id)


def validation_batches(job: CpuJob, dataset) -> Optional[Iterator[dict]]:
    """This rank's micro-batches of one evaluation: the first ``eval_iters`` global batches
    of the validation split, in its own order, laid out over DP ranks as in training."""
    if dataset is None:
        return None
    return _batches(job, dataset, 0, lambda position: position)


def _batches(job: CpuJob, dataset, position: int, sample_id) -> Iterator[dict]:
    dp_rank = parallel_state.get_data_parallel_rank()
    while True:
        start = position + dp_rank * job.micro_batch
        samples = [dataset[sample_id(p)] for p in range(start, start + job.micro_batch)]
        yield torch.utils.data.default_collate(samples)
        position += job.micro_batch * job.dp


_EPOCH_ORDERS: Dict[tuple, np.ndarray] = {}


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _EPOCH_ORDERS:
        _EPOCH_ORDERS.clear()  # only the current epoch is ever needed again
        _EPOCH_ORDERS[key] = np.random.RandomState((seed + 7919 * epoch) % 2**32).permutation(n)
    return _EPOCH_ORDERS[key]


def documents(dataset) -> List[int]:
    """The corpus documents a GPTDataset draws its sequences from (sorted, unique)."""
    return sorted(set(int(d) for d in np.unique(dataset.document_index)))
