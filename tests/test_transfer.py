"""Block KV crosses between host and device once per batch each way (``runtime/transfer.py``),
with results bit-identical to moving the blocks one at a time.

No GPU here: a hook makes the CPU count as a device block KV must cross to, so the batched path
runs and every crossing (``transfer._copy``) is counted; the ``gpu`` test repeats it on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcllm_sdk.runtime import transfer
from rcllm_sdk.runtime.hot_blocks import HotBlocks
from rcllm_sdk.runtime.refresh import refresh_blocks
from tests.test_runtime import LABELS, DictStore, engine_for, make_prompt, tiny_model


def record_crossings(patch, fake_device: bool) -> list[str]:
    """Log ``in``/``out`` per non-empty batch moved and ``copy`` per crossing (``fake_device``:
    the CPU counts as a device)."""
    log: list[str] = []
    if fake_device:
        patch.setattr(transfer, "_moves", lambda device: True)
    copy = transfer._copy

    def counted_copy(tensor, device, non_blocking):
        log.append("copy")
        return copy(tensor, device, non_blocking)

    patch.setattr(transfer, "_copy", counted_copy)
    for name, direction in (("to_device", "in"), ("to_host", "out")):
        move = getattr(transfer, name)

        def logged(kvs, *device, move=move, direction=direction):
            if kvs:
                log.append(direction)
            return move(kvs, *device)

        patch.setattr(transfer, name, logged)
    return log


def one_block_at_a_time(patch) -> None:
    """The previous path: each block moved by itself."""
    patch.setattr(transfer, "to_device", lambda kvs, device: [kv.to(device) for kv in kvs])
    patch.setattr(transfer, "to_host", lambda kvs: [kv.cpu() for kv in kvs])


def block_views(rng_seed: int = 0) -> list[torch.Tensor]:
    """Non-contiguous ``[2, L, T, H, D]`` views of different lengths, as the store's unpacking gives."""
    torch.manual_seed(rng_seed)
    return [torch.randn(2, 3, t + 1, 2, 8)[:, :, :t] for t in (4, 7, 1)]


def test_a_batch_crosses_once_each_way_as_equal_independent_tensors(monkeypatch):
    kvs = block_views()
    log = record_crossings(monkeypatch, fake_device=True)
    moved = transfer.to_device(kvs, "cpu")
    assert log == ["in", "copy"]
    for kv, out in zip(kvs, moved, strict=True):
        assert torch.equal(out, kv) and out.is_contiguous()
        assert out.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()  # the store may reuse it
    back = transfer.to_host(moved)
    assert log == ["in", "copy", "out", "copy"]
    assert all(torch.equal(b, kv) for b, kv in zip(back, kvs, strict=True))


def test_on_a_cpu_runner_nothing_is_copied(monkeypatch):
    kvs = block_views()
    log = record_crossings(monkeypatch, fake_device=False)
    assert all(a is b for a, b in zip(transfer.to_device(kvs, "cpu"), kvs, strict=True))
    assert all(a is b for a, b in zip(transfer.to_host(kvs), kvs, strict=True))
    assert log == ["in", "out"]  # called, but no crossing


STORED_KINDS = ("system", "user", "item")


def serve_batches(device: str, log: list[str]) -> tuple[list[list[str]], list[torch.Tensor], dict]:
    """The crossings of each batch, the logits and the stores' values. Batches: a cold rcllm
    batch; a fresh engine over that store (hot cache off, so blocks come from the store) on a
    batch of stored and new blocks; the same two in ``prefix`` mode; a forced refresh of the
    7 stored blocks of a prompt, 4 per batch."""
    model = tiny_model("llama").to(device)
    rng = np.random.default_rng(3)
    old, new = make_prompt(rng), make_prompt(rng)
    store, prefix_store, logits, logs = DictStore(), DictStore(), [], []
    cold = engine_for(model, "block_head:2", store)
    warm = engine_for(model, "block_head:2", store, hot_block_bytes=0)
    prefix = engine_for(model, "block_head:2", prefix_store)
    for engine, score, batch in (
        (cold, cold.score, [old]),
        (warm, warm.score, [old, new]),
        (prefix, prefix.score_prefix, [old]),
        (prefix, prefix.score_prefix, [old, new]),
    ):
        logits += [s.logits for s in score(batch, [LABELS] * len(batch))]
        engine.flush()
        logs.append(log[:])
        log.clear()
    stored = [b for b in old.blocks if b.kind in STORED_KINDS]
    refresh_blocks(warm, stored, batch_blocks=4, force=True, progress=False)
    logs.append(log[:])
    values = {**store.values, **{("prefix", k): v for k, v in prefix_store.values.items()}}
    return logs, logits, values


def check_one_crossing_per_batch_and_identical_results(monkeypatch, device: str, fake_device: bool):
    with monkeypatch.context() as patch:
        logs, logits, values = serve_batches(device, record_crossings(patch, fake_device))
    with monkeypatch.context() as patch:
        one_block_at_a_time(patch)
        _, reference_logits, reference_values = serve_batches(device, [])
    one_each_way = ["in", "copy", "out", "copy"]
    assert logs == [["out", "copy"], one_each_way, ["out", "copy"], one_each_way, ["out", "copy"] * 2]
    assert all(torch.equal(a, b) for a, b in zip(logits, reference_logits, strict=True))
    assert values.keys() == reference_values.keys()
    assert all(torch.equal(values[k], reference_values[k]) for k in values)


def test_engine_batches_cross_once_each_way_with_bit_identical_results(monkeypatch):
    check_one_crossing_per_batch_and_identical_results(monkeypatch, "cpu", fake_device=True)


@pytest.mark.gpu
def test_engine_batches_cross_once_each_way_on_cuda(monkeypatch):
    check_one_crossing_per_batch_and_identical_results(monkeypatch, "cuda", fake_device=False)


def test_the_hot_cache_keeps_its_own_copy_of_a_view_into_a_batch_buffer():
    buffer = torch.arange(100.0)
    hot = HotBlocks(max_bytes=1000)
    hot.put_many({1: buffer[10:20], 2: buffer[:100]})
    kept = hot.get_many([1, 2])
    assert torch.equal(kept[1], buffer[10:20]) and kept[1].untyped_storage().nbytes() == 40
    assert kept[2] is not None and kept[2].data_ptr() == buffer.data_ptr()  # already its own
    assert hot.bytes == 440
