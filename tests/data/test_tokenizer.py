"""Reading inputs and training tokenizers: the pydoc corpus, SentencePiece settings, bad texts."""

import json

import pytest
import sentencepiece as spm
from pydoc_data.topics import topics as PYDOC_TOPICS

from polycom_megatron import data
from polycom_megatron.data import pydoc_corpus, train_tokenizer

from conftest import VOCAB_SIZE


# ----- corpus and tokenizer -----------------------------------------------------------


def test_pydoc_corpus_writes_one_document_per_topic(corpus, tmp_path):
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == len(PYDOC_TOPICS)
    assert {doc["id"] for doc in docs} == {f"pydoc/{name}" for name in PYDOC_TOPICS}
    assert all(doc["text"] == PYDOC_TOPICS[doc["id"][len("pydoc/"):]] for doc in docs)

    assert pydoc_corpus(tmp_path / "few.jsonl", max_docs=5) == 5
    assert len((tmp_path / "few.jsonl").read_text(encoding="utf-8").splitlines()) == 5


def test_tokenizer_trains_on_pydoc_corpus(tokenizer, sp, corpus):
    assert tokenizer.model_path.is_file() and tokenizer.vocab_path.is_file()
    assert tokenizer.documents == len(PYDOC_TOPICS)
    assert sp.get_piece_size() == VOCAB_SIZE
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)

    text = json.loads(corpus.read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # no normalization, no whitespace collapsing
    assert len(ids) < len(text.encode("utf-8")) / 2  # it learned merges, not just bytes


def test_tokenizer_byte_fallback_never_produces_unk(sp):
    text = "naïve café 你好 🙂\tand a tab"
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_tokenizer_from_iterable_counts_bad_texts(tmp_path):
    texts = list(PYDOC_TOPICS.values()) + ["", "   ", 5]
    summary = train_tokenizer(iter(texts), tmp_path / "tok", 600)
    assert summary.documents == len(PYDOC_TOPICS)
    assert {r: s.count for r, s in summary.bad_records.items()} == {
        "empty_text": 2,
        "non_string_field": 1,
    }
    assert spm.SentencePieceProcessor(model_file=str(summary.model_path)).get_piece_size() == 600


def test_tokenizer_treats_a_list_of_strings_as_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file name"):
        train_tokenizer(["not a file name"], tmp_path / "tok", 500)


def test_tokenizer_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(data.TokenizerError, match="smaller --vocab-size"):
        train_tokenizer(iter(["a tiny corpus"] * 20), tmp_path / "tok", 5000)


def test_tokenizer_vocab_below_the_characters_asks_for_a_larger_one(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300))  # 300 distinct characters
    with pytest.raises(data.TokenizerError, match="use a larger --vocab-size"):
        train_tokenizer(iter([text] * 5), tmp_path / "tok", 100)


