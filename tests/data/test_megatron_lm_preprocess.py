"""Our `data build` writes the bytes Megatron-LM's own tools/preprocess_data.py writes, with
one worker or two on either side (real Megatron-LM trees; see tests/megatron_lm.py)."""

import filecmp

import pytest

from megatron_lm import needs_trees, run_python, trees

from conftest import run_cli


@needs_trees
def test_build_matches_preprocess_data(corpus, tokenizer, tmp_path):
    ours = {}
    for workers in (1, 2):
        prefix = tmp_path / f"ours{workers}"
        result = run_cli("data", "build", corpus, "--tokenizer", tokenizer.model_path,
                         "--output-prefix", prefix, "--workers", workers, "--quiet")
        assert result.returncode == 0, result.stderr
        ours[workers] = prefix
    tools = [tree for tree in trees() if (tree / "tools" / "preprocess_data.py").is_file()]
    if not tools:
        pytest.skip("no tree has tools/preprocess_data.py")
    for tree in tools:
        theirs = tmp_path / tree.name
        result = run_python(tree, [
            tree / "tools" / "preprocess_data.py", "--input", corpus, "--output-prefix", theirs,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            tokenizer.model_path, "--append-eod", "--workers", "2",
        ], cwd=tmp_path)
        assert result.returncode == 0, f"{tree.name}: {result.stderr[-2000:]}"
        for workers, prefix in ours.items():
            for suffix in (".bin", ".idx"):
                assert filecmp.cmp(f"{prefix}{suffix}", f"{theirs}_text_document{suffix}",
                                   shallow=False), f"{tree.name}, --workers {workers}: {suffix}"
