"""Block KV between the host (where the store keeps it) and the runner's device, one copy per batch.

Many small copies cost a fixed latency each, so a batch's blocks cross together: reads are
gathered into one pinned host buffer and moved with one asynchronous copy, write-backs are
concatenated on the device and moved back with one copy. On a CPU runner nothing moves and
nothing is copied here. Every crossing goes through ``_copy``.
"""

from __future__ import annotations

import torch

from ..errors import InvariantError

HOST = torch.device("cpu")


def to_device(kvs: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host block KV on ``device``, in one host-to-device copy: contiguous views of one buffer
    that share no memory with ``kvs`` (the same tensors, uncopied, when ``device`` is the host)."""
    device = torch.device(device)
    if not kvs or not _moves(device):
        return list(kvs)
    dtype = _one_dtype(kvs)
    pinned = device.type == "cuda"  # an asynchronous copy needs page-locked host memory
    buffer = torch.empty(sum(kv.numel() for kv in kvs), dtype=dtype, pin_memory=pinned)
    for kv, part in zip(kvs, _parts(buffer, kvs), strict=True):
        part.copy_(kv)
    return _parts(_copy(buffer, device, non_blocking=pinned), kvs)


def to_host(kvs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[2, L, T_b, H, D]`` device block KV on the host, in one device-to-host copy (views along
    the token axis of one buffer; the same tensors when they are on the host already)."""
    if not kvs or not _moves(kvs[0].device):
        return list(kvs)
    _one_dtype(kvs)
    packed = torch.cat(kvs, dim=2)
    asynchronous = packed.is_cuda  # lands in pinned memory, at full bandwidth; waited for below
    host = _copy(packed, HOST, non_blocking=asynchronous)
    if asynchronous:
        _wait_for_copy(packed.device)
    return list(torch.split(host, [kv.shape[2] for kv in kvs], dim=2))


def _moves(device: torch.device) -> bool:
    """Whether block KV has to cross to reach (or leave) ``device``."""
    return device.type != HOST.type


def _copy(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """The one host-device crossing of a batch."""
    return tensor.to(device, non_blocking=non_blocking)


def _parts(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of a flat ``buffer`` shaped as the tensors of ``like``."""
    parts, offset = [], 0
    for kv in like:
        parts.append(buffer[offset : offset + kv.numel()].view(kv.shape))
        offset += kv.numel()
    return parts


def _one_dtype(kvs: list[torch.Tensor]) -> torch.dtype:
    dtypes = {kv.dtype for kv in kvs}
    if len(dtypes) != 1:
        raise InvariantError(f"one batch of block KV holds one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _wait_for_copy(device: torch.device) -> None:
    """Block this thread until the work queued so far on ``device``'s current stream is done."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    done.synchronize()
