"""Keyed integrity of stored blocks: with RCLLM_KV_HMAC_KEY set, a writer without the key cannot
make a reader use its KV, even with a valid header and crc."""

import struct
import zlib

import pytest
import torch

from rcllm_sdk.cache import codec, open_store

KEY, NS = 7, codec.namespace_tag("ns")


def _kv():
    return torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 8)


def _forged(blob: torch.Tensor) -> torch.Tensor:
    """What a writer without the key can do: change the payload and recompute the crc."""
    out = blob.clone()
    out[codec.HEADER_BYTES] ^= 0x40
    header = out[: codec.HEADER_BYTES].numpy().tobytes()
    head_size = struct.calcsize("<4sBBBxQQ4IQ")
    nbytes = struct.unpack_from("<Q", header, head_size - 8)[0]
    payload = out[codec.HEADER_BYTES : codec.HEADER_BYTES + nbytes].numpy()
    crc = zlib.crc32(payload, zlib.crc32(header[:head_size]))
    out[head_size : head_size + 4] = torch.frombuffer(bytearray(struct.pack("<I", crc)), dtype=torch.uint8)
    return out


def test_a_sealed_value_round_trips_and_a_forged_one_is_rejected():
    sealed = codec.encode(KEY, NS, _kv(), mac_key=b"k1")
    assert sealed.numel() == codec.HEADER_BYTES + _kv().numel() * 4 + codec.TAG_BYTES
    assert torch.equal(codec.decode(sealed, KEY, NS, mac_key=b"k1"), _kv())
    assert codec.decode(sealed, KEY, NS, mac_key=b"k2") is None  # another key
    assert codec.decode(_forged(sealed), KEY, NS, mac_key=b"k1") is None  # crc fixed, tag not


def test_a_keyed_reader_refuses_unsealed_values_that_a_crc_alone_would_pass():
    plain = codec.encode(KEY, NS, _kv())
    forged = _forged(plain)
    assert codec.decode(forged, KEY, NS) is not None  # the crc is no defence against a writer
    assert codec.decode(plain, KEY, NS, mac_key=b"k1") is None


def test_an_unkeyed_reader_still_reads_sealed_values():
    assert torch.equal(codec.decode(codec.encode(KEY, NS, _kv(), mac_key=b"k1"), KEY, NS), _kv())


@pytest.mark.parametrize("shared", ["memory", "fs"])
def test_a_store_opened_with_the_key_ignores_blocks_written_without_it(shared, tmp_path, monkeypatch):
    url = "memory://integrity-shared" if shared == "memory" else f"fs://{tmp_path}/kv"
    monkeypatch.setenv(codec.MAC_KEY_ENV, "")
    with open_store(url, "ns") as writer:
        writer.put(1, _kv())
        writer.put(3, _kv())
        assert torch.equal(writer.get(1), _kv())
    monkeypatch.setenv(codec.MAC_KEY_ENV, "shared secret")
    with open_store(url, "ns") as reader:
        assert reader.get(1) is None and reader.batched_get([3]) == [None]
        assert reader.stats.errors >= 1  # counted as a corrupt value, not a plain miss
        reader.put(2, _kv())
        assert torch.equal(reader.get(2), _kv())
    with open_store(url, "ns") as other_reader:  # another process with the key, for fs://
        if shared == "fs":
            assert torch.equal(other_reader.get(2), _kv())
