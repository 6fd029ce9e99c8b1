"""One prepared directory: corpus -> tokenizer -> indexed dataset -> check, and its manifest.

``prepare`` writes ``tokenizer.model``/``.vocab``, ``<name>.bin``/``.idx`` (and
``pydoc_corpus.jsonl`` without inputs) and ``<name>.manifest.json``, which records the
settings it was asked for and the checksum of each of those files. All are staged and
renamed into place together, the manifest last, so Ctrl-C, kill -9 or a full disk during a
re-run leaves the previous directory as it was.

A second ``prepare`` with the same settings over a prepared directory checks it and reuses
it; with other settings it refuses, naming the flags that differ, unless ``overwrite``.
``use_prepared`` is the same rule for a command that needs data (``train-cpu --data-dir``):
a prepared directory is used as it is, with its vocabulary size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from polycom_megatron.data.build import (
    DEFAULT_DATASET_NAME,
    BuildSummary,
    build_indexed_dataset,
    dataset_files,
)
from polycom_megatron.data.check import DatasetInfo, verify_dataset
from polycom_megatron.data.errors import CorruptDatasetError, DataError, SettingsMismatchError
from polycom_megatron.data.files import Staging, check_writable_dir, refuse_existing
from polycom_megatron.data.manifest import Manifest, digest_file, input_sha256, manifest_path
from polycom_megatron.data.sources import PathLike, pydoc_corpus_bytes, resolve_input_files
from polycom_megatron.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    TokenizerSummary,
    load_tokenizer,
    tokenizer_files,
    train_tokenizer,
)

TOKENIZER_NAME = "tokenizer"
PYDOC_CORPUS_NAME = "pydoc_corpus.jsonl"

# A prepare setting -> the flag that sets it, for messages that name the flag.
SETTING_FLAGS = {
    "inputs": "--inputs",
    "max_docs": "--max-docs",
    "vocab_size": "--vocab-size",
    "model_type": "--model-type",
    "name": "--name",
    "json_key": "--json-key",
    "input_format": "--input-format",
    "text_split": "--text-split",
}


@dataclass
class PrepareSummary:
    """What ``prepare`` left in its output directory (``reused``: it was already there)."""

    output_dir: Path
    data_prefix: Path
    tokenizer_model: Path
    check: DatasetInfo
    corpus_path: Optional[Path] = None
    tokenizer: Optional[TokenizerSummary] = None
    build: Optional[BuildSummary] = None
    reused: bool = False

    def describe(self) -> str:
        parts = []
        if self.reused:
            parts.append(f"{self.output_dir} is already prepared with these settings: reusing it")
        if self.corpus_path is not None and not self.reused:
            parts.append(f"Corpus: {self.corpus_path}")
        parts += [s.describe() for s in (self.tokenizer, self.build) if s is not None]
        parts.append(self.check.describe())
        parts.append(
            "Use it for training with:\n"
            f"  --data-path {self.data_prefix} --tokenizer-model {self.tokenizer_model}"
        )
        return "\n".join(parts)


def prepare_settings(
    inputs: Optional[Sequence[PathLike]], vocab_size: int, model_type: str, json_key: str,
    input_format: str, text_split: str, max_docs: Optional[int], name: str,
) -> Dict[str, Any]:
    return dict(
        inputs=[os.path.abspath(p) for p in inputs] if inputs else None,
        max_docs=None if inputs else max_docs,
        vocab_size=vocab_size,
        model_type=model_type,
        name=name,
        json_key=json_key,
        input_format=input_format,
        text_split=text_split,
    )


def prepare(
    output_dir: PathLike,
    inputs: Optional[Sequence[PathLike]] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    model_type: str = "bpe",
    json_key: str = "text",
    input_format: str = "auto",
    text_split: str = "paragraph",
    max_docs: Optional[int] = None,
    dataset_name: str = DEFAULT_DATASET_NAME,
    progress: bool = True,
    overwrite: bool = False,
    workers: Optional[int] = None,
) -> PrepareSummary:
    """Corpus -> tokenizer -> indexed dataset -> check, all inside ``output_dir``.

    Without ``inputs`` the corpus is the pydoc corpus (``output_dir/pydoc_corpus.jsonl``,
    ``max_docs`` topics at most). The tokenizer is trained on the same files it then
    tokenizes. See the module docstring for what happens over an existing directory.
    """
    output_dir = Path(output_dir)
    prefix = output_dir / dataset_name
    model_path, vocab_path = tokenizer_files(output_dir / TOKENIZER_NAME)
    corpus_path = None if inputs else output_dir / PYDOC_CORPUS_NAME
    settings = prepare_settings(inputs, vocab_size, model_type, json_key, input_format,
                                text_split, max_docs, dataset_name)
    input_paths = resolve_input_files(inputs) if inputs else []
    if not overwrite:
        if manifest_path(prefix).is_file():
            return _reuse(output_dir, prefix, settings)
        outputs = [model_path, vocab_path, *dataset_files(prefix)]
        refuse_existing(outputs + ([corpus_path] if corpus_path else []), "--output-dir",
                        "not prepared by this version: no manifest")
    check_writable_dir(output_dir, "--output-dir")
    reading = dict(json_key=json_key, input_format=input_format, text_split=text_split)
    with Staging() as staging:
        staged: List[Path] = [model_path, vocab_path]
        if corpus_path is not None:
            payload, _ = pydoc_corpus_bytes(max_docs)
            input_paths = [staging.write_bytes(corpus_path, payload)]
            staged.append(corpus_path)
        tokenizer = train_tokenizer(input_paths, output_dir / TOKENIZER_NAME, vocab_size,
                                    model_type=model_type, overwrite=True, staging=staging,
                                    **reading)
        build = build_indexed_dataset(
            input_paths, staging.add(model_path), prefix, progress=progress, overwrite=True,
            staging=staging, workers=workers, **reading,
        )
        manifest = build.manifest
        manifest.prepare = settings
        manifest.tokenizer["model_type"] = model_type
        for final in staged:
            manifest.files[final.name] = digest_file(staging.add(final))
        staging.write_bytes(manifest_path(prefix), manifest.to_json())
        staging.commit(last=[manifest_path(prefix)])
    tokenizer.model_path, tokenizer.vocab_path = model_path, vocab_path
    check = verify_dataset(prefix, tokenizer=model_path)
    return PrepareSummary(output_dir, prefix, model_path, check, corpus_path, tokenizer, build)


def _reuse(output_dir: Path, prefix: Path, settings: Dict[str, Any]) -> PrepareSummary:
    manifest = Manifest.load(manifest_path(prefix))
    recorded = manifest.prepare
    if recorded is None:
        raise SettingsMismatchError(
            f"{prefix} was built by `data build`, not `data prepare`; nothing was changed. "
            "Pass --overwrite to prepare the directory again, or choose another --output-dir"
        )
    differ = [key for key in SETTING_FLAGS if recorded.get(key) != settings.get(key)]
    if differ:
        was = " ".join(_flag(key, recorded.get(key)) for key in differ)
        now = " ".join(_flag(key, settings.get(key)) for key in differ)
        raise SettingsMismatchError(
            f"{output_dir} was prepared with {was}, this command asks for {now}; nothing was "
            "changed. Pass --overwrite to prepare it again with the new settings, or choose "
            "another --output-dir"
        )
    _check_inputs_unchanged(manifest, output_dir)
    model_path = manifest.tokenizer_path() or Path(manifest.tokenizer["file"])
    try:
        check = verify_dataset(prefix, tokenizer=model_path)
    except DataError as exc:
        raise CorruptDatasetError(
            f"{output_dir} is prepared with these settings but damaged: {exc}"
        ) from None
    return PrepareSummary(output_dir, prefix, model_path, check, reused=True)


def _flag(key: str, value: Any) -> str:
    if value is None:
        return f"no {SETTING_FLAGS[key]}"
    if isinstance(value, list):
        value = " ".join(value)
    return f"{SETTING_FLAGS[key]} {value}"


def _check_inputs_unchanged(manifest: Manifest, output_dir: Path) -> None:
    if manifest.prepare.get("inputs") is None:
        return  # the pydoc corpus lives in the directory and is checksummed with it
    for recorded in manifest.inputs:
        path = Path(recorded["path"])
        if recorded.get("sha256") is None:
            continue  # a pipe: nothing to compare
        if not path.exists() or input_sha256(path) != recorded["sha256"]:
            state = "is gone" if not path.exists() else "has changed"
            raise SettingsMismatchError(
                f"--inputs {path} {state} since {output_dir} was prepared from it; nothing was "
                "changed. Pass --overwrite to prepare the directory again from the inputs as "
                "they are now, or choose another --output-dir"
            )


# --------------------------------------------------------------------------------------
# Using prepared data (train-cpu --data-dir)
# --------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    prefix: Path
    tokenizer_model: Path
    vocab_size: int
    info: DatasetInfo
    prepared_now: bool


def use_prepared(
    data_dir: PathLike,
    vocab_size: Optional[int],
    vocab_flag: str = "--vocab-size",
    dataset_name: str = DEFAULT_DATASET_NAME,
    progress: bool = True,
    report=print,
) -> PreparedData:
    """The dataset in ``data_dir``, checked; prepared there (pydoc corpus, ``vocab_size`` or
    the default) only if the directory holds none of prepare's files.

    Data already there is never replaced: a prepared directory is used with its own
    vocabulary size, and a ``vocab_size`` that disagrees is refused naming ``vocab_flag``.
    """
    data_dir = Path(data_dir)
    prefix = data_dir / dataset_name
    model_path, _ = tokenizer_files(data_dir / TOKENIZER_NAME)
    if manifest_path(prefix).is_file() or (model_path.is_file() and Path(f"{prefix}.bin").is_file()):
        try:
            info = verify_dataset(prefix, tokenizer=model_path)
        except DataError as exc:
            raise CorruptDatasetError(
                f"the data in {data_dir} is damaged, so it is not used (and not replaced): "
                f"{exc}"
            ) from None
        found = load_tokenizer(model_path).get_piece_size()
        if vocab_size is not None and vocab_size != found:
            raise SettingsMismatchError(
                f"{vocab_flag} {vocab_size} disagrees with the prepared data in {data_dir}, "
                f"whose tokenizer has {found} pieces; drop {vocab_flag} to train with {found}, "
                "or point the data directory at an empty one to prepare new data there"
            )
        report(f"data: using {info.describe()}")
        return PreparedData(prefix, model_path, found, info, prepared_now=False)
    present = [p.name for p in [model_path, *dataset_files(prefix)] if p.exists()]
    if present:
        raise DataError(
            f"{data_dir} holds {', '.join(present)} but no complete dataset, so it is neither "
            "used nor replaced: point the data directory at an empty one, or prepare this one "
            f"with `polycom-megatron data prepare --output-dir {data_dir} --overwrite`"
        )
    report(f"data: preparing corpus, tokenizer and dataset in {data_dir} ...")
    summary = prepare(data_dir, vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
                      dataset_name=dataset_name, progress=progress)
    if progress:
        report(summary.describe())
    size = load_tokenizer(model_path).get_piece_size()
    return PreparedData(prefix, model_path, size, summary.check, prepared_now=True)
