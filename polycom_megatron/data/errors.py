"""What can be wrong with data, as exception types whose message says what and how to fix it."""

from __future__ import annotations

REBUILD_HINT = (
    "Rebuild it with `polycom-megatron data build --tokenizer TOKENIZER.model "
    "--output-prefix PREFIX --overwrite INPUT...`."
)


class DataError(ValueError):
    """Something about the data (not the code) is wrong; the message says what and how to fix it."""


class CorruptDatasetError(DataError):
    """An indexed dataset (.bin/.idx pair), or a file its manifest lists, is missing or damaged."""


class NoValidRecordsError(DataError):
    """An input file yielded no usable document at all."""


class TokenizerError(DataError):
    """A tokenizer could not be trained or loaded, or is not the one a dataset was made with."""


class OutputExistsError(DataError):
    """A command would replace files that are already there, and was not told to (--overwrite)."""


class SettingsMismatchError(DataError):
    """Existing prepared data was made with other settings than the command asks for."""
