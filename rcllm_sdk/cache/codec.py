"""One stored value = a 64-byte header + the tensor's raw bytes.

The header makes every value self-describing and self-checking, so any process can read it
back and a garbled, truncated or misfiled value is rejected instead of returned:

    magic "RCKV" | version | dtype code | ndim | key (u64) | namespace tag (u64) |
    dims (4 x u32) | payload bytes (u64) | crc32 of header-so-far + payload

Backends only ever move opaque byte blobs (a 1-D uint8 tensor).
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import torch

from ..errors import InvariantError

HEADER_BYTES = 64  # the payload starts 64-byte aligned inside the blob
MAGIC, VERSION = b"RCKV", 1
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


def blob_size(kv: torch.Tensor) -> int:
    return HEADER_BYTES + kv.numel() * kv.element_size()


def encode_into(dst: torch.Tensor, key: int, ns_tag: int, kv: torch.Tensor) -> None:
    """Write header + bytes of ``kv`` into ``dst`` (uint8, exactly ``blob_size(kv)`` long)."""
    payload = _as_bytes(kv)  # [nbytes] uint8, a view when kv is contiguous on CPU
    dims = list(kv.shape) + [0] * (MAX_DIMS - kv.dim())
    head = _HEAD.pack(MAGIC, VERSION, DTYPES[kv.dtype], kv.dim(), key, ns_tag, *dims, payload.numel())
    crc = zlib.crc32(payload.numpy(), zlib.crc32(head))
    header = (head + _CRC.pack(crc)).ljust(HEADER_BYTES, b"\0")
    dst[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    dst[HEADER_BYTES:].copy_(payload)


def encode(key: int, ns_tag: int, kv: torch.Tensor) -> torch.Tensor:
    blob = torch.empty(blob_size(kv), dtype=torch.uint8)
    encode_into(blob, key, ns_tag, kv)
    return blob


def decode(blob: torch.Tensor, key: int, ns_tag: int, check_crc: bool = True) -> torch.Tensor | None:
    """The tensor stored in ``blob`` (a fresh copy), or None if the blob is not a valid value
    of this key and namespace (wrong magic/version/key/namespace, bad shape, wrong length, crc).

    ``check_crc=False`` skips the payload checksum (about 1.3 ms per 2 MB) for blobs that
    never left this process's memory since they were encoded or verified."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < HEADER_BYTES:
        return None
    header = blob[:HEADER_BYTES].numpy().tobytes()
    magic, version, code, ndim, got_key, got_tag, *rest = _HEAD.unpack_from(header)
    dims, nbytes = rest[:MAX_DIMS], rest[MAX_DIMS]
    if (magic, version, got_key, got_tag) != (MAGIC, VERSION, key, ns_tag) or code not in _CODE_TO_DTYPE:
        return None
    dtype, shape = _CODE_TO_DTYPE[code], tuple(dims[:ndim]) if 1 <= ndim <= MAX_DIMS else None
    if (
        shape is None
        or nbytes > MAX_PAYLOAD_BYTES
        or blob.numel() != HEADER_BYTES + nbytes
        or _numel(shape) * dtype.itemsize != nbytes
    ):
        return None
    payload = blob[HEADER_BYTES:]
    (crc,) = _CRC.unpack_from(header, _HEAD.size)
    if check_crc and zlib.crc32(payload.numpy(), zlib.crc32(header[: _HEAD.size])) != crc:
        return None
    out = torch.empty(shape, dtype=dtype)
    _as_bytes(out).copy_(payload)
    return out


def _as_bytes(kv: torch.Tensor) -> torch.Tensor:
    kv = kv.detach().to("cpu").contiguous()
    return kv.reshape(-1).view(torch.uint8)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
