"""Every input format gives the same dataset as JSONL; bad input fails in one line."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from polycom_megatron.data import build_indexed_dataset

from conftest import one_error_line, run_cli

# No blank line inside a document, so the plain-text file can hold them as paragraphs.
TEXTS = [
    "The first good document.",
    "Second one, with Unicode: naïve café 你好 🙂.",
    "def f(x):\n    return x + 1",
    "  indented start and two  spaces",
]


def _jsonl_bytes():
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)).encode()


def _write_inputs(directory: Path):
    """The same documents in each format; name -> path."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {"jsonl": directory / "docs.jsonl", "jsonl.gz": directory / "docs.jsonl.gz",
             "jsonl.zst": directory / "docs.jsonl.zst", "txt": directory / "docs.txt",
             "parquet": directory / "docs.parquet", "hf": directory / "docs_hf"}
    paths["jsonl"].write_bytes(_jsonl_bytes())
    paths["jsonl.gz"].write_bytes(gzip.compress(_jsonl_bytes()))
    # Two frames: readers must read across them.
    half = len(_jsonl_bytes()) // 2
    compressor = zstandard.ZstdCompressor()
    paths["jsonl.zst"].write_bytes(compressor.compress(_jsonl_bytes()[:half])
                                   + compressor.compress(_jsonl_bytes()[half:]))
    paths["txt"].write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, paths["parquet"], row_group_size=2)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(paths["hf"]))
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _write_inputs(tmp_path_factory.mktemp("formats"))


def test_every_format_gives_the_jsonl_dataset(inputs, tokenizer, tmp_path):
    built = {}
    for name, path in inputs.items():
        prefix = tmp_path / name.replace(".", "_")
        summary = build_indexed_dataset(path, tokenizer.model_path, prefix, progress=False,
                                        workers=1)
        assert summary.documents == len(TEXTS), name
        built[name] = (Path(f"{summary.output_prefix}.bin").read_bytes(),
                       Path(f"{summary.output_prefix}.idx").read_bytes())
    for name, files in built.items():
        assert files == built["jsonl"], f"{name} differs from the JSONL dataset"


def test_parquet_bad_rows_are_counted_with_their_row(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": ["good text", None, "   ", "more text"]}), path)
    summary = build_indexed_dataset(path, tokenizer.model_path, tmp_path / "ds", progress=False,
                                    workers=1)
    assert summary.documents == 2
    assert summary.bad_records["non_string_field"].first_locations == [f"{path}:2"]
    assert summary.bad_records["empty_text"].first_locations == [f"{path}:3"]


def _corrupt_inputs(directory: Path, inputs):
    gz = directory / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(_jsonl_bytes() * 50)[:-40])  # cut short
    zst = directory / "garbage.jsonl.zst"
    zst.write_bytes(b"not zstd at all\n" * 10)
    no_column = directory / "nocol.parquet"
    shutil.copyfile(inputs["parquet"], no_column)
    not_parquet = directory / "fake.parquet"
    not_parquet.write_bytes(b"PAR1 but nothing else")
    not_dataset = directory / "plain_dir"
    not_dataset.mkdir()
    (not_dataset / "x.txt").write_text("hello", encoding="utf-8")
    return [
        (gz, [], "the gzip data is corrupt or cut short"),
        (zst, [], "the zstd data is corrupt or cut short"),
        (no_column, ["--json-key", "body"], "has no column 'body' (its columns: id, text)"),
        (not_parquet, [], "is not a readable Parquet file"),
        (not_dataset, [], "is not a Hugging Face datasets directory"),
    ]


def test_bad_input_of_each_format_fails_in_one_line(inputs, tokenizer, tmp_path):
    for path, flags, message in _corrupt_inputs(tmp_path, inputs):
        out = tmp_path / f"out_{path.name.replace('.', '_')}"
        result = run_cli("data", "build", path, "--tokenizer", tokenizer.model_path,
                         "--output-prefix", out, "--quiet", "--workers", "1", *flags)
        assert result.returncode == 1, (path, result.stderr)
        line = one_error_line(result)
        assert message in line, (path, line)
        assert not list(tmp_path.glob(f"{out.name}*")), "a failed build left files"


def test_missing_extra_is_named(inputs, tokenizer, tmp_path):
    import subprocess
    import sys

    # As on a machine without pyarrow: the import fails, the error names the extra.
    code = ("import sys; sys.modules['pyarrow'] = None; "
            "from polycom_megatron.data.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, "build", str(inputs["parquet"]), "--tokenizer",
         str(tokenizer.model_path), "--output-prefix", str(tmp_path / "ds"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "pip install 'polycom-megatron[parquet]'" in one_error_line(result)


def test_a_datasets_directory_is_checksummed_so_a_change_shows(tmp_path):
    import datasets

    from polycom_megatron.data.manifest import describe_input

    folder = tmp_path / "docs_hf"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder))
    first = describe_input(folder)
    assert first["sha256"] is not None and first["bytes"] > 0
    assert describe_input(folder) == first
    shutil.rmtree(folder)
    datasets.Dataset.from_dict({"text": TEXTS[:-1] + ["another last document"]}).save_to_disk(str(folder))
    assert describe_input(folder)["sha256"] != first["sha256"]
