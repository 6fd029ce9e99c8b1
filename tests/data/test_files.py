"""Staged writes: partial files beside the final ones, locked while written, renamed together;
an exception (Ctrl-C included) removes them; a stale one is removed by the next writer."""

from pathlib import Path

import pytest

from polycom_megatron.data.errors import DataError
from polycom_megatron.data.files import Staging, final_path, partial_path


def test_partial_names_keep_the_suffix():
    assert partial_path(Path("d/corpus.bin")).name == "corpus.partial.bin"
    assert final_path(partial_path(Path("d/a.model"))).name == "a.model"


def test_commit_replaces_and_an_exception_keeps_the_old(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with Staging() as staging:
            staging.write_bytes(target, b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with Staging() as staging:
        staging.write_bytes(target, b"new")
        staging.commit()
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_a_locked_partial_is_another_writer_and_a_stale_one_is_removed(tmp_path, capsys):
    target = tmp_path / "a.bin"
    with Staging() as first:
        first.add(target)
        with pytest.raises(DataError, match="another run is writing"):
            Staging().add(target)
    partial_path(target).write_bytes(b"left by kill -9")
    with Staging() as staging:
        staging.write_bytes(target, b"x")
        staging.commit()
    assert "left by an interrupted run" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [target]
