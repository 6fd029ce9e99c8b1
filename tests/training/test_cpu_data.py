"""The CPU job's training and validation splits, as the ranks build them (megatron-core's
GPTDataset through ``cpu_data``, here in one process): validation documents are never
trained on, and the validation sequences do not depend on the run's seed."""

from pathlib import Path

import numpy as np
import pytest

from polycom_megatron.training import cpu_data, cpu_loop
from polycom_megatron.training.cpu_job import CpuJob

pytestmark = pytest.mark.timeout(300)


def job(output_dir: Path, data_dir: Path, **changes) -> CpuJob:
    fields = dict(output_dir=output_dir, data=data_dir, world_size=1, tp=1, seq_len=32,
                  micro_batch=2, global_batch=4, vocab_size=512, eval_iters=2)
    fields.update(changes)
    return CpuJob(**fields).validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    cpu_loop.prepare_data(job(path.parent / "unused", path), quiet=True)
    return path


@pytest.mark.parametrize("split", ["90,10,0", "70,20,10"])
def test_validation_documents_are_never_trained_on(data_dir, tmp_path, split):
    run = job(tmp_path, data_dir, split=split)
    train, valid = cpu_data.train_dataset(run), cpu_data.validation_dataset(run)
    train_docs, valid_docs = set(cpu_data.documents(train)), set(cpu_data.documents(valid))
    assert train_docs and valid_docs
    assert not train_docs & valid_docs, sorted(train_docs & valid_docs)
    # Megatron's split is by documents in corpus order: training takes the first ones.
    assert max(train_docs) < min(valid_docs)
    shares = run.split_shares
    n_docs = len(np.asarray(train.dataset.sequence_lengths))
    assert len(train_docs) == round(shares[0] * n_docs)
    # Every validation sequence is cut from the validation documents alone (one epoch).
    tokens = int(np.asarray(train.dataset.sequence_lengths)[sorted(valid_docs)].sum())
    assert len(valid) == (tokens - 1) // run.seq_len


def test_validation_sequences_do_not_depend_on_the_seed_and_training_ones_do(data_dir, tmp_path):
    a, b = job(tmp_path / "a", data_dir, seed=1), job(tmp_path / "b", data_dir, seed=2)
    valid_a, valid_b = cpu_data.validation_dataset(a), cpu_data.validation_dataset(b)
    assert len(valid_a) == len(valid_b) > 0
    for i in range(len(valid_a)):
        assert valid_a[i]["tokens"].tolist() == valid_b[i]["tokens"].tolist(), i
    train_a, train_b = cpu_data.train_dataset(a), cpu_data.train_dataset(b)
    assert train_a[0]["tokens"].tolist() != train_b[0]["tokens"].tolist()


def test_a_validation_split_smaller_than_the_evaluation_is_refused(data_dir, tmp_path):
    run = job(tmp_path, data_dir, split="99,1,0", eval_iters=500)
    with pytest.raises(ValueError, match=r"validation split \(--split 99,1,0\) yields only .* "
                       r"fewer than --eval-iters x --global-batch = 2000"):
        cpu_data.validation_dataset(run)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(split="0,10,0"), "--split 0,10,0 leaves no documents to train on"),
        (dict(split="100,0,0"), "--split 100,0,0 holds out no validation documents"),
        (dict(split="9,x"), "--split '9,x': expected up to three non-negative weights"),
    ],
)
def test_bad_splits_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        job(tmp_path, tmp_path, **changes)


def test_no_validation_needs_no_validation_split(tmp_path):
    assert job(tmp_path, tmp_path, split="100,0,0", eval_iters=0).split_shares == (1.0, 0.0, 0.0)
