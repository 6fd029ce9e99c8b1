"""Pretraining data: text -> SentencePiece tokenizer -> Megatron indexed dataset, checked.

One module per job, in the order a fresh machine needs them:

* ``readers``: input formats (JSONL plain/.gz/.zst, text, Parquet, datasets directories)
  -> raw records, streamed;
* ``sources``: raw records -> documents (bad records counted) and the offline pydoc corpus;
* ``tokenizer``: train and load SentencePiece models;
* ``encode``: documents -> token ids, in worker processes, long ones in slices;
* ``build``: token ids -> ``<prefix>.bin``/``.idx`` with Megatron-Core's builder, plus the
  manifest; ``progress``: its progress bar;
* ``manifest``: what a built dataset is (inputs, tokenizer, counts, checksums);
* ``check``: is a dataset intact and made by this tokenizer (``verify_dataset``);
* ``prepare``: all of the above into one directory, and reusing a prepared one;
* ``files``: how outputs are written (atomic, never replacing without being asked);
* ``pretrain_inputs``: the checks ``polycom-megatron pretrain`` runs on its --data-path;
* ``cli``: ``polycom-megatron data ...``.

Megatron-Core is imported lazily (only where indexed datasets are read or written) because
importing it pulls in all of ``megatron.core`` and takes seconds.
"""

from polycom_megatron.data.build import (
    DEFAULT_DATASET_NAME,
    BuildSummary,
    build_indexed_dataset,
    token_dtype_for_vocab,
)
from polycom_megatron.data.check import (
    DatasetInfo,
    dataset_prefix,
    validate_indexed_dataset,
    verify_dataset,
)
from polycom_megatron.data.errors import (
    REBUILD_HINT,
    CorruptDatasetError,
    DataError,
    NoValidRecordsError,
    OutputExistsError,
    SettingsMismatchError,
    TokenizerError,
)
from polycom_megatron.data.manifest import Manifest, manifest_path
from polycom_megatron.data.prepare import PrepareSummary, PreparedData, prepare, use_prepared
from polycom_megatron.data.sources import (
    BAD_RECORD_REASONS,
    BadRecord,
    Record,
    iter_records,
    pydoc_corpus,
    resolve_input_files,
)
from polycom_megatron.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_ID,
    TokenizerSummary,
    load_tokenizer,
    train_tokenizer,
)


def main(argv=None) -> int:
    """``polycom-megatron data ...`` (see ``cli``)."""
    from polycom_megatron.data.cli import main as cli_main

    return cli_main(argv)
