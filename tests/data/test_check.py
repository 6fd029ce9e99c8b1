"""Checking datasets: structural damage (no manifest) refused with a message naming it."""

import os
import struct

import numpy as np
import pytest

from polycom_megatron.data import CorruptDatasetError, validate_indexed_dataset

from conftest import VOCAB_SIZE, patch_bytes, truncate


# ----- validation ---------------------------------------------------------------------


def test_validate_accepts_a_healthy_dataset(dirty_build):
    summary, _ = dirty_build
    info = validate_indexed_dataset(summary.output_prefix, vocab_size=VOCAB_SIZE)
    assert (info.documents, info.sequences, info.tokens) == (3, 3, summary.tokens)
    assert info.dtype == "uint16"
    assert 0 < info.max_token_id < VOCAB_SIZE


# Offsets into the .idx: a 34-byte header, then int32 lengths, int64 pointers and int64
# document boundaries. The dataset under test has 3 sequences and 4 boundaries.
_POINTERS = 34 + 3 * 4
_BOUNDARIES = _POINTERS + 3 * 8

DAMAGE = {
    "bin truncated": (lambda p: truncate(f"{p}.bin", 2), r"\.bin is truncated"),
    "bin emptied": (lambda p: truncate(f"{p}.bin", os.path.getsize(f"{p}.bin")), "is empty"),
    "bin too long": (
        lambda p: open(f"{p}.bin", "ab").write(b"\0\0"), "different builds"),
    "bin missing": (lambda p: os.remove(f"{p}.bin"), r"\.bin does not exist"),
    "idx bad magic": (lambda p: patch_bytes(f"{p}.idx", 0, b"XX"), "not a Megatron"),
    "idx truncated": (lambda p: truncate(f"{p}.idx", 8), r"\.idx has .* truncated"),
    "idx header only": (lambda p: truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 20),
                        r"\.idx is truncated"),
    "idx unknown dtype": (lambda p: patch_bytes(f"{p}.idx", 17, b"\x63"), "unknown token dtype"),
    "idx pointer": (
        lambda p: patch_bytes(f"{p}.idx", _POINTERS + 8, struct.pack("<q", 1 << 40)),
        "sequence 1 points to byte",
    ),
    "idx length": (lambda p: patch_bytes(f"{p}.idx", 34, struct.pack("<i", 10_000)), "points to byte"),
    "idx boundary": (
        lambda p: patch_bytes(f"{p}.idx", _BOUNDARIES + 3 * 8, struct.pack("<q", 9)), "rebuild|Rebuild"
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_validate_refuses_damage(damaged_copy, damage):
    validate_indexed_dataset(damaged_copy)  # the copy is healthy before the damage
    corrupt, message = DAMAGE[damage]
    corrupt(damaged_copy)
    with pytest.raises(CorruptDatasetError, match=message) as caught:
        validate_indexed_dataset(damaged_copy)
    assert "polycom-megatron data build" in str(caught.value)


def test_validate_refuses_tokens_outside_the_vocabulary(dirty_build):
    summary, _ = dirty_build
    with pytest.raises(CorruptDatasetError, match="different tokenizer"):
        validate_indexed_dataset(summary.output_prefix, vocab_size=10)




def test_idx_dtype_codes_are_megatrons():
    from megatron.core.datasets.indexed_dataset import DType

    from polycom_megatron.data.check import IDX_DTYPE_CODES

    assert {code: np.dtype(t) for code, t in IDX_DTYPE_CODES.items()} == {
        member.value: np.dtype(getattr(np, member.name)) for member in DType
    }
