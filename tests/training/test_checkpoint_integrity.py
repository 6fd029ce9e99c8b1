"""The manifest records every file of a checkpoint directory and catches each change to
it; the tracker is read strictly. (No ranks: plain files stand in for the shards; the
fault-injection suite does the same on real checkpoints through the command.)"""

import json

import pytest

from polycom_megatron.training import checkpoint_integrity as integrity


@pytest.fixture
def ckpt(tmp_path):
    path = integrity.iteration_dir(tmp_path, 5)
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (path / "common.pt").write_bytes(b"common state")
    integrity.write_manifest(path, 5, {"model": {"hidden": 32}})
    integrity.write_tracker(tmp_path, 5)
    return path


def test_an_intact_checkpoint_has_no_problems(ckpt):
    assert integrity.problems(ckpt, expected_iteration=5) == []
    manifest, problem = integrity.read_manifest(ckpt)
    assert problem is None and manifest["fingerprint"] == {"model": {"hidden": 32}}
    assert sorted(manifest["files"]) == ["__0_0.distcp", "common.pt"]
    assert integrity.read_tracker(ckpt.parent) == (5, None)
    assert integrity.saved_iterations(ckpt.parent) == [5]


def test_each_change_is_one_problem_naming_the_file(ckpt):
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    (ckpt / "common.pt").write_bytes(b"common")
    found = integrity.problems(ckpt, expected_iteration=5)
    assert found == [
        f"{shard} is damaged: its SHA-256 differs from the one recorded at save",
        f"{ckpt / 'common.pt'} is truncated or extended: 6 bytes, 12 at save",
    ]
    (ckpt / "common.pt").unlink()
    assert f"{ckpt / 'common.pt'} is missing" in integrity.problems(ckpt)


def test_a_damaged_or_missing_manifest_is_named(ckpt):
    manifest = ckpt / integrity.MANIFEST_FILE
    record = json.loads(manifest.read_text())
    record["fingerprint"]["model"]["hidden"] = 64  # valid JSON, wrong content
    manifest.write_text(json.dumps(record))
    assert integrity.problems(ckpt) == [f"{manifest} is damaged (it does not match its own checksum)"]
    manifest.unlink()
    assert "is missing: the save did not finish" in integrity.problems(ckpt)[0]


def test_the_manifest_must_record_the_tracked_iteration(ckpt):
    assert integrity.problems(ckpt, expected_iteration=6) == [
        f"{ckpt / integrity.MANIFEST_FILE} records iteration 5, not 6"
    ]


@pytest.mark.parametrize("raw, what", [(b"", "is empty"), (b"5", "holds b'5'"), (b"\x00\n", "holds b'\\x00\\n'")])
def test_a_damaged_tracker_is_named(ckpt, raw, what):
    # b"5": ours always end with a newline, so next to our manifest it was cut short.
    root = ckpt.parent
    (root / integrity.TRACKER_FILE).write_bytes(raw)
    iteration, problem = integrity.read_tracker(root)
    assert iteration is None
    assert problem.startswith(f"{root / integrity.TRACKER_FILE} is damaged: it {what}")


def test_megatron_lm_trackers_have_no_newline(tmp_path):
    # Megatron-LM's pretrain writes "5" (no newline) and no manifest of ours.
    integrity.iteration_dir(tmp_path, 5).mkdir()
    (tmp_path / integrity.TRACKER_FILE).write_bytes(b"5")
    assert integrity.read_tracker(tmp_path) == (5, None)
