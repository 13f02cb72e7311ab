"""Precompute block KV into a store (``rcllm refresh``)."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from ..errors import InvariantError
from ..prompt.renderer import SYSTEM, Block
from . import blockkv, transfer
from .engine import BlockEngine

log = logging.getLogger("rcllm_sdk.runtime")


def refresh_blocks(
    engine: BlockEngine,
    blocks: list[Block],
    batch_blocks: int = 64,
    force: bool = False,
    progress: bool = True,
    retries: int = 2,
    retry_wait_s: float = 1.0,
) -> dict:
    """Compute and store the canonical KV of every block not already stored everywhere the
    store keeps it (all of them with ``force``).

    Writes are synchronous: a write some node refused is retried ``retries`` times,
    ``retry_wait_s`` apart, and what still failed is reported (``write_failures``,
    ``failed_keys``). Each block is written whole or not at all, so an interrupted refresh
    leaves a consistent store and a re-run finishes it. When every write landed, a cluster
    store records its shard map on each node (``write_manifests``).

    ``blocks`` must include the system block. Returns counts, seconds, blocks/s and tokens/s.
    """
    started = time.perf_counter()
    unique = list({b.content_hash: b for b in blocks}.values())
    systems = [b for b in unique if b.kind == SYSTEM]
    if len(systems) != 1:
        raise InvariantError(f"refresh needs exactly one system block, got {len(systems)}")
    store = engine.store
    present = (
        [False] * len(unique)
        if force
        else store.batched_stored([b.content_hash for b in unique], placement=[b.item_id for b in unique])
    )
    todo = [b for b, stored in zip(unique, present, strict=False) if not stored]
    engine.hot.discard([b.content_hash for b in todo])  # rewritten below: never serve the old value
    system_kv = engine.compute(systems, None)[systems[0].content_hash]
    tokens, failed = 0, []
    bar = tqdm(total=len(todo), desc="refresh blocks", unit="block", disable=not progress)
    for start in range(0, len(todo), batch_blocks):
        batch = todo[start : start + batch_blocks]
        kvs = engine.compute([b for b in batch if b.kind != SYSTEM], system_kv)
        kvs.update({b.content_hash: system_kv for b in batch if b.kind == SYSTEM})
        kvs = dict(zip(kvs, transfer.to_host(list(kvs.values())), strict=True))  # one copy per batch
        failed += _store(store, batch, kvs, retries, retry_wait_s)
        tokens += sum(len(b.token_ids) for b in batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    manifests_failed = store.write_manifests() if not failed and hasattr(store, "write_manifests") else []
    seconds = time.perf_counter() - started
    if failed:
        log.warning(
            "refresh: %d of %d blocks could not be written everywhere after %d retries; "
            "run the refresh again to finish them",
            len(failed),
            len(todo),
            retries,
        )
    return {
        "blocks": len(unique),
        "computed": len(todo),
        "already_stored": len(unique) - len(todo),
        "tokens": tokens,
        "seconds": seconds,
        "blocks_per_s": len(todo) / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "write_failures": len(failed),
        "failed_keys": [f"{key:016x}" for key in failed[:20]],
        "manifest_failures": manifests_failed,
    }


def _store(store, batch: list[Block], kvs: dict, retries: int, wait_s: float) -> list[int]:
    """Write a batch, retrying the keys some node refused; the keys that still failed."""
    placement = {b.content_hash: b.item_id for b in batch}
    pending = [b.content_hash for b in batch]
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(wait_s)
        pending = store.batched_put(
            [(key, blockkv.pack(kvs[key], key)) for key in pending],
            placement=[placement[key] for key in pending],
        )
        if not pending:
            break
    return pending
