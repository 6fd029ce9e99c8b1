"""Chunked checksums: each chunk's sha256 is the sha256 of that slice of the file, and a
change is reported with the byte range of the first chunk it touched."""

import hashlib
import os

from polycom_megatron.data.manifest import MIN_CHUNK_BYTES, chunk_bytes_for, digest_file


def test_chunks_are_the_sha256_of_each_slice(tmp_path):
    path = tmp_path / "blob"
    payload = os.urandom(3 * MIN_CHUNK_BYTES + 12345)
    path.write_bytes(payload)
    digest = digest_file(path)
    assert digest.chunk_bytes == MIN_CHUNK_BYTES and digest.bytes == len(payload)
    step = digest.chunk_bytes
    assert digest.chunks == [
        hashlib.sha256(payload[i : i + step]).hexdigest() for i in range(0, len(payload), step)
    ]
    assert digest.sha256 == hashlib.sha256(payload).hexdigest()
    assert digest_file(path, chunk_bytes=1 << 20).chunks == [digest.sha256]


def test_a_change_is_located(tmp_path):
    path = tmp_path / "blob"
    payload = bytearray(os.urandom(4 * MIN_CHUNK_BYTES))
    path.write_bytes(payload)
    recorded = digest_file(path)
    assert recorded.first_difference(digest_file(path)) is None
    payload[2 * MIN_CHUNK_BYTES + 7] ^= 1
    path.write_bytes(payload)
    found = recorded.first_difference(digest_file(path, recorded.chunk_bytes))
    assert found == f"bytes {2 * MIN_CHUNK_BYTES:,}-{3 * MIN_CHUNK_BYTES - 1:,} changed"
    path.write_bytes(payload[:-1])
    assert "truncated" in recorded.first_difference(digest_file(path, recorded.chunk_bytes))


def test_chunk_size_keeps_manifests_small():
    assert chunk_bytes_for(0) == MIN_CHUNK_BYTES
    one_tb = 1 << 40
    assert one_tb / chunk_bytes_for(one_tb) <= 4096
