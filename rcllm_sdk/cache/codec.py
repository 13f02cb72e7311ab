"""One stored value = a 64-byte header + the tensor's raw bytes.

The header makes every value self-describing and self-checking, so any process can read it
back and a garbled, truncated or misfiled value is rejected instead of returned:

    magic "RCKV" | version | dtype code | ndim | key (u64) | namespace tag (u64) |
    dims (4 x u32) | payload bytes (u64) | crc32 of header-so-far + payload

The crc catches accidents, not a writer: anyone who can write to the store can re-encode a
block with a valid crc. With a key in ``RCLLM_KV_HMAC_KEY`` (any string, shared by every
process that serves the same blocks), values are sealed (version 2): an HMAC-SHA256 tag of the
header and payload follows the payload, and a reader holding the key rejects a value whose tag
does not verify, or that carries none. Cost: one SHA-256 pass over the block on write and on
every read from outside the process (measured in ``tests/test_integrity.py``'s neighbour,
docs/reliability.md).

Backends only ever move opaque byte blobs (a 1-D uint8 tensor).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib

import torch

from ..errors import InvariantError

HEADER_BYTES = 64  # the payload starts 64-byte aligned inside the blob
MAGIC, VERSION, SEALED_VERSION = b"RCKV", 1, 2
MAC_KEY_ENV = "RCLLM_KV_HMAC_KEY"
TAG_BYTES = 32  # HMAC-SHA256, after the payload of a sealed value
MAX_DIMS = 4
DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.uint8: 4}  # uint8: small records
MAX_PAYLOAD_BYTES = 1 << 30  # a header claiming more is rejected before anything is copied
_CODE_TO_DTYPE = {code: dtype for dtype, code in DTYPES.items()}
_HEAD = struct.Struct("<4sBBBxQQ4IQ")  # everything the crc covers, in front of it
_CRC = struct.Struct("<I")


def namespace_tag(namespace: str) -> int:
    """A 64-bit tag of the namespace, stored in every header (a value read under another
    namespace is rejected even if a backend mixed the keys up)."""
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8).digest(), "little")


def mac_key_from_env() -> bytes | None:
    """The sealing key from ``RCLLM_KV_HMAC_KEY`` (None when unset or empty: values are unsealed)."""
    value = os.environ.get(MAC_KEY_ENV, "")
    return value.encode() if value else None


def check_tensor(kv: torch.Tensor) -> None:
    """Raise InvariantError for a value the codec cannot store."""
    if not isinstance(kv, torch.Tensor):
        raise InvariantError(f"a KV block must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype not in DTYPES:
        raise InvariantError(f"KV dtype must be one of {[str(d) for d in DTYPES]}, got {kv.dtype}")
    if not 1 <= kv.dim() <= MAX_DIMS:
        raise InvariantError(
            f"a KV block has 1 to {MAX_DIMS} dims ([2, L, T, W]), got shape {tuple(kv.shape)}"
        )


def blob_size(kv: torch.Tensor, mac_key: bytes | None = None) -> int:
    return HEADER_BYTES + kv.numel() * kv.element_size() + (TAG_BYTES if mac_key else 0)


def encode_into(
    dst: torch.Tensor, key: int, ns_tag: int, kv: torch.Tensor, mac_key: bytes | None = None
) -> None:
    """Write header + bytes of ``kv`` (+ the HMAC tag with ``mac_key``) into ``dst`` (uint8,
    exactly ``blob_size(kv, mac_key)`` long)."""
    payload = _as_bytes(kv)  # [nbytes] uint8, a view when kv is contiguous on CPU
    dims = list(kv.shape) + [0] * (MAX_DIMS - kv.dim())
    version = SEALED_VERSION if mac_key else VERSION
    head = _HEAD.pack(MAGIC, version, DTYPES[kv.dtype], kv.dim(), key, ns_tag, *dims, payload.numel())
    crc = zlib.crc32(payload.numpy(), zlib.crc32(head))
    header = (head + _CRC.pack(crc)).ljust(HEADER_BYTES, b"\0")
    end = HEADER_BYTES + payload.numel()
    dst[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    dst[HEADER_BYTES:end].copy_(payload)
    if mac_key:
        dst[end:].copy_(torch.frombuffer(bytearray(_tag(mac_key, header, payload)), dtype=torch.uint8))


def encode(key: int, ns_tag: int, kv: torch.Tensor, mac_key: bytes | None = None) -> torch.Tensor:
    blob = torch.empty(blob_size(kv, mac_key), dtype=torch.uint8)
    encode_into(blob, key, ns_tag, kv, mac_key)
    return blob


def decode(
    blob: torch.Tensor, key: int, ns_tag: int, check_crc: bool = True, mac_key: bytes | None = None
) -> torch.Tensor | None:
    """The tensor stored in ``blob`` (a fresh copy), or None if the blob is not a valid value
    of this key and namespace (wrong magic/version/key/namespace, bad shape, wrong length, crc;
    with ``mac_key``: unsealed, or a tag that does not verify).

    ``check_crc=False`` skips the payload checksum and tag (about 1.3 ms per 2 MB) for blobs
    that never left this process's memory since they were encoded or verified."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < HEADER_BYTES:
        return None
    header = blob[:HEADER_BYTES].numpy().tobytes()
    magic, version, code, ndim, got_key, got_tag, *rest = _HEAD.unpack_from(header)
    dims, nbytes = rest[:MAX_DIMS], rest[MAX_DIMS]
    if (magic, got_key, got_tag) != (MAGIC, key, ns_tag) or code not in _CODE_TO_DTYPE:
        return None
    if version not in (VERSION, SEALED_VERSION) or (mac_key and version != SEALED_VERSION):
        return None
    tag_bytes = TAG_BYTES if version == SEALED_VERSION else 0
    dtype, shape = _CODE_TO_DTYPE[code], tuple(dims[:ndim]) if 1 <= ndim <= MAX_DIMS else None
    if (
        shape is None
        or nbytes > MAX_PAYLOAD_BYTES
        or blob.numel() != HEADER_BYTES + nbytes + tag_bytes
        or _numel(shape) * dtype.itemsize != nbytes
    ):
        return None
    payload = blob[HEADER_BYTES : HEADER_BYTES + nbytes]
    if check_crc and not _verified(header, payload, blob[HEADER_BYTES + nbytes :], mac_key):
        return None
    out = torch.empty(shape, dtype=dtype)
    _as_bytes(out).copy_(payload)
    return out


def _verified(header: bytes, payload: torch.Tensor, tag: torch.Tensor, mac_key: bytes | None) -> bool:
    (crc,) = _CRC.unpack_from(header, _HEAD.size)
    if zlib.crc32(payload.numpy(), zlib.crc32(header[: _HEAD.size])) != crc:
        return False
    return mac_key is None or hmac.compare_digest(tag.numpy().tobytes(), _tag(mac_key, header, payload))


def _tag(mac_key: bytes, header: bytes, payload: torch.Tensor) -> bytes:
    mac = hmac.new(mac_key, header, hashlib.sha256)
    mac.update(payload.numpy())
    return mac.digest()


def _as_bytes(kv: torch.Tensor) -> torch.Tensor:
    kv = kv.detach().to("cpu").contiguous()
    return kv.reshape(-1).view(torch.uint8)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
