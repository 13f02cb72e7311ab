"""Precompute block KV into a store (``rcllm refresh``)."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..prompt.renderer import SYSTEM, Block
from .engine import BlockEngine


def refresh_blocks(engine: BlockEngine, blocks: list[Block], batch_blocks: int = 64, force: bool = False,
                   progress: bool = True) -> dict:
    """Compute and store the canonical KV of every block not already stored (all with ``force``).

    ``blocks`` must include the system block. Returns counts, seconds, blocks/s and tokens/s.
    """
    started = time.perf_counter()
    unique = list({b.content_hash: b for b in blocks}.values())
    systems = [b for b in unique if b.kind == SYSTEM]
    if len(systems) != 1:
        raise ValueError(f"refresh needs exactly one system block, got {len(systems)}")
    present = [False] * len(unique) if force else engine.store.batched_contains([b.content_hash for b in unique])
    todo = [b for b, stored in zip(unique, present) if not stored and b.kind != SYSTEM]
    system_kv = engine.block_kv(systems)[0][systems[0].content_hash]
    engine.flush()
    tokens = 0
    bar = tqdm(total=len(todo), desc="refresh blocks", unit="block", disable=not progress)
    for start in range(0, len(todo), batch_blocks):
        batch = todo[start : start + batch_blocks]
        engine.compute_and_store(batch, system_kv)
        engine.flush()
        tokens += sum(len(b.token_ids) for b in batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    seconds = time.perf_counter() - started
    return {"blocks": len(unique), "computed": len(todo), "already_stored": len(unique) - 1 - len(todo),
            "tokens": tokens, "seconds": seconds, "blocks_per_s": len(todo) / seconds if seconds else 0.0,
            "tokens_per_s": tokens / seconds if seconds else 0.0}
