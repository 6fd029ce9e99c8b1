"""``polycom-megatron bench``'s checks that come before any work: numbers at parse time,
the device, and the output folder (writable, nothing replaced unasked)."""

import pytest
import torch

from polycom_megatron.bench import throughput as T


@pytest.mark.parametrize("flag, value", [
    ("--rounds", "-3"), ("--rounds", "0"), ("--warmup", "0"), ("--sample-time", "nan"),
    ("--sample-time", "-1"), ("--seq-len", "0"), ("--micro-batch", "two"), ("--layers", "2,0"),
    ("--layers", "1,2,3"), ("--model-kernel", "cuda"),
])
def test_bad_values_are_refused_while_parsing(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        T.parse_args([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_rounds_and_warmup_are_used_as_given(tmp_path):
    s = T.resolve_settings(T.parse_args(["--smoke", "--rounds", "1", "--warmup", "3",
                                         "--out-dir", str(tmp_path)]))
    assert (s.rounds, s.warmup) == (1, 3)
    s = T.resolve_settings(T.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    assert (s.rounds, s.warmup) == (2, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here"):
        T.resolve_settings(T.parse_args(["--device", "cuda", "--out-dir", str(tmp_path)]))


def test_the_output_folder_is_checked_first(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(SystemExit):
        T.parse_args(["--out-dir", str(afile / "sub")])
    done = tmp_path / "done"
    done.mkdir()
    (done / "throughput.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds throughput.json; pass --overwrite"):
        T.resolve_settings(T.parse_args(["--smoke", "--out-dir", str(done)]))
    assert (done / "throughput.json").read_text() == "{}"
    T.resolve_settings(T.parse_args(["--smoke", "--out-dir", str(done), "--overwrite"]))
    fresh = tmp_path / "a" / "b"
    T.resolve_settings(T.parse_args(["--smoke", "--out-dir", str(fresh)]))
    assert fresh.is_dir() and not any(fresh.iterdir())  # proven writable, left empty
