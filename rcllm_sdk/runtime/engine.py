"""Score rendered prompts from cached block KV (``rcllm``) or cached token prefixes (``prefix``).

``rcllm``: fetch each system/user/item block's canonical KV from the store (computing and
writing back the misses), assemble them in prompt order, rotate keys to their real
positions, then run the policy's selected tokens through every layer. A miss is computed at
its canonical place like any stored block, so a ranking never depends on what happened to
be cached.

``prefix`` (the baseline users run today, vLLM/SGLang semantics): the prompt is cut into
chunks of ``chunk`` tokens, each keyed by the hash of the whole prefix up to its end; the
longest run of stored chunks from the start is reused and everything after it is computed
by the same runner and attention path, then its full chunks are written back.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..cache.base import LOCAL, REMOTE, Read
from ..model.scoring import label_logits
from ..prompt.renderer import SYSTEM, RenderedPrompt
from ..types import CacheStats
from . import blockkv
from .model_view import ModelView, shift_keys
from .policies import DEFAULT_POLICY, FRESH_KINDS, Policy, fresh_ranges, parse_policy
from .precompute import compute_blocks, compute_system, empty_kv
from .runner import Narrowing, PackedBatch, ranges_mask, run_selected

log = logging.getLogger("rcllm_sdk.runtime")


@dataclass(slots=True)
class Scored:
    """Label logits of one prompt (``[K]``) and what the cache did for it."""

    logits: torch.Tensor
    cache: CacheStats


class BlockEngine:
    """Cached-KV scoring for one ranker and one block store. Safe to share between threads."""

    def __init__(
        self,
        ranker,
        store,
        policy: str | Policy = DEFAULT_POLICY,
        backend: str = "auto",
        prefix_chunk: int = 16,
    ):
        self.ranker, self.store, self.backend, self.prefix_chunk = ranker, store, backend, prefix_chunk
        self.policy = parse_policy(policy)
        # Write-back runs beside the request, as LMCache stores after prefill: a request's
        # logits never wait for the store. ``flush()`` waits for what was queued.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcllm-kv-writeback")
        self._pending: list[Future] = []
        self._pending_lock = threading.Lock()
        self.view = ModelView.of(ranker.model)
        self.inv_freq = self.view.base.rotary_emb.inv_freq

    # ---- rcllm ------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self, prompts: list[RenderedPrompt], label_ids: list[list[int]], policy: Policy | None = None
    ) -> list[Scored]:
        """Rank with reused block KV and the policy's selective recompute."""
        policy = policy or self.policy
        found, computed, reads = self.block_kv(
            [b for p in prompts for b in p.blocks if b.kind not in FRESH_KINDS]
        )
        kv, stats = self.assemble(prompts, found, computed, reads)
        layouts = [_kinds_lengths(p) for p in prompts]
        masks = [
            ranges_mask(policy.selected_ranges(*layout), p.text_length)
            for layout, p in zip(layouts, prompts, strict=False)
        ]
        pinned = torch.cat(
            [
                ranges_mask(fresh_ranges(*layout), p.text_length)[m]
                for layout, p, m in zip(layouts, prompts, masks, strict=False)
            ]
        )
        narrowing = Narrowing(policy.ratio, policy.check_layer) if policy.name == "deviation" else None
        hidden, rows = self._run([p.input_ids for p in prompts], kv, masks, pinned, narrowing)
        for s, n, p in zip(stats, rows.tolist(), prompts, strict=False):
            s.recomputed_fraction = n / p.text_length
        return self._scored(hidden, label_ids, stats)

    def assemble(
        self,
        prompts: list[RenderedPrompt],
        found: dict[int, torch.Tensor],
        computed: set[int] = frozenset(),
        reads: dict[int, Read] | None = None,
    ) -> tuple[torch.Tensor, list[CacheStats]]:
        """Packed ``[2, L, N, kv_heads, head_dim]`` cache of the prompts, keys at their real
        positions (fresh tokens are zero placeholders), and per-prompt hit/miss figures
        (``reads``: where each stored block came from)."""
        pieces, deltas, stats = [], [], []
        reads = reads or {}
        for prompt in prompts:
            system_len = len(prompt.blocks[0].token_ids)
            figures = CacheStats(recomputed_fraction=0.0)
            nodes = set()
            for block in prompt.blocks:
                n = len(block.token_ids)
                kv = found.get(block.content_hash)
                if kv is None:
                    pieces.append(empty_kv(self.view, n))
                    deltas.append(torch.zeros(n))
                    continue
                if block.content_hash in computed:
                    figures.misses += 1
                else:
                    figures.hits += 1
                    figures.kv_bytes_read += kv.numel() * kv.element_size()
                    _count_source(figures, nodes, reads.get(block.content_hash), kv)
                pieces.append(kv.to(self.view.device, non_blocking=True))
                deltas.append(
                    torch.full((n,), float(0 if block.kind == SYSTEM else block.start - system_len))
                )
            figures.nodes_touched = len(nodes)
            stats.append(figures)
        kv = torch.cat(pieces, dim=2)
        kv[0] = shift_keys(kv[0], torch.cat(deltas).to(self.view.device), self.inv_freq)
        return kv, stats

    def block_kv(self, blocks) -> tuple[dict[int, torch.Tensor], set[int], dict[int, Read]]:
        """Canonical KV of every distinct block (store hits; misses computed and written back),
        the hashes that were computed, and where each stored one was read from."""
        unique = list({b.content_hash: b for b in blocks}.values())
        systems = [b for b in unique if b.kind == SYSTEM]
        if len(systems) != 1:
            raise ValueError(f"one system block per batch expected, got {len(systems)}")
        found, reads = self._fetch(unique)
        missing = [b for b in unique if b.content_hash not in found]
        if systems[0].content_hash not in found:
            found.update(self.compute_and_store(systems, None))
        others = [b for b in missing if b.kind != SYSTEM]
        if others:
            found.update(self.compute_and_store(others, found[systems[0].content_hash]))
        return found, {b.content_hash for b in missing}, reads

    def _fetch(self, blocks) -> tuple[dict[int, torch.Tensor], dict[int, Read]]:
        found, reads = {}, {}
        got = self.store.batched_read([b.content_hash for b in blocks], placement=[b.item_id for b in blocks])
        for block, read in zip(blocks, got, strict=False):
            value = read.value
            reads[block.content_hash] = read
            kv = blockkv.unpack(
                value,
                block.content_hash,
                len(block.token_ids),
                self.view.n_layers,
                self.view.n_kv_heads,
                self.view.head_dim,
                self.view.dtype,
            )
            if kv is None and value is not None:
                log.warning(
                    "block %016x: stored KV does not match it (shape, dtype or header); recomputing",
                    block.content_hash,
                )
            if kv is not None:
                found[block.content_hash] = kv
        return found, reads

    def compute_and_store(self, blocks, system_kv: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Compute blocks at their canonical positions and queue them for the store."""
        computed = self.compute(blocks, system_kv)
        items = {b.content_hash: b.item_id for b in blocks}
        self._write_back([(key, kv, items[key]) for key, kv in computed.items()])
        return computed

    @torch.inference_mode()
    def compute(self, blocks, system_kv: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Canonical KV of blocks (``[2, L, T, H, D]`` by content hash). System blocks need
        nothing before them; every other block needs its system block's KV."""
        computed = {
            b.content_hash: compute_system(self.view, list(b.token_ids), self.backend)
            for b in blocks
            if b.kind == SYSTEM
        }
        others = [b for b in blocks if b.kind != SYSTEM]
        if others:
            if system_kv is None:
                raise ValueError("user/item blocks are computed after the system block: pass its KV")
            kvs = compute_blocks(
                self.view, system_kv, [list(b.token_ids) for b in others], backend=self.backend
            )
            computed.update({b.content_hash: kv for b, kv in zip(others, kvs, strict=False)})
        return computed

    # ---- prefix baseline --------------------------------------------------------------------
    @torch.inference_mode()
    def score_prefix(self, prompts: list[RenderedPrompt], label_ids: list[list[int]]) -> list[Scored]:
        """Rank with the longest cached token prefix reused and the rest computed."""
        chunk, pieces, reused, stats, keys_of = self.prefix_chunk, [], [], [], []
        for prompt in prompts:
            ids = prompt.input_ids
            keys = self.prefix_keys(ids)
            hit_keys = []
            for key, present in zip(keys, self.store.batched_contains(keys), strict=False):
                if not present:
                    break
                hit_keys.append(key)
            chunks = self._prefix_chunks(hit_keys)
            used = min(len(chunks) * chunk, len(ids) - 1) // chunk * chunk if chunks else 0
            chunks = chunks[: used // chunk]
            pieces.extend([c.to(self.view.device) for c in chunks] + [empty_kv(self.view, len(ids) - used)])
            reused.append(used)
            keys_of.append(keys)
            stats.append(
                CacheStats(
                    len(chunks),
                    len(keys) - len(chunks),
                    0.0,
                    sum(c.numel() * c.element_size() for c in chunks),
                )
            )
        kv = torch.cat(pieces, dim=2)
        masks = [torch.arange(p.text_length) >= used for p, used in zip(prompts, reused, strict=False)]
        token_lists = [p.input_ids for p in prompts]
        hidden, rows = self._run(
            token_lists, kv, masks, torch.ones(int(sum(m.sum() for m in masks)), dtype=torch.bool)
        )
        self._store_prefix(token_lists, kv, reused, keys_of)
        for s, n, p in zip(stats, rows.tolist(), prompts, strict=False):
            s.recomputed_fraction = n / p.text_length
        return self._scored(hidden, label_ids, stats)

    def prefix_keys(self, ids: list[int]) -> list[int]:
        """One key per full chunk: a hash of the model fingerprint and every token up to the chunk's end."""
        h = hashlib.blake2b(self.ranker.fingerprint.encode() + b"prefix", digest_size=8)
        keys = []
        for start in range(0, len(ids) - self.prefix_chunk + 1, self.prefix_chunk):
            h.update(b"".join(int(t).to_bytes(4, "little") for t in ids[start : start + self.prefix_chunk]))
            keys.append(int.from_bytes(h.copy().digest(), "little"))
        return keys

    def _prefix_chunks(self, keys: list[int]) -> list[torch.Tensor]:
        chunks = []
        for key, value in zip(keys, self.store.batched_get(keys) if keys else [], strict=False):
            kv = blockkv.unpack(
                value,
                key,
                self.prefix_chunk,
                self.view.n_layers,
                self.view.n_kv_heads,
                self.view.head_dim,
                self.view.dtype,
            )
            if kv is None:
                break
            chunks.append(kv)
        return chunks

    @torch.inference_mode()
    def store_prefix(self, ids: list[int]) -> int:
        """Compute and store the full chunks of a token prefix not stored yet (what a cache
        warmed by earlier requests holds); returns how many chunks were written."""
        keys = self.prefix_keys(ids)
        if not keys:
            return 0
        hits = 0
        for present in self.store.batched_contains(keys):
            if not present:
                break
            hits += 1
        chunks = self._prefix_chunks(keys[:hits])
        used, end = len(chunks) * self.prefix_chunk, len(keys) * self.prefix_chunk
        if used == end:
            return 0
        kv = torch.cat([c.to(self.view.device) for c in chunks] + [empty_kv(self.view, end - used)], dim=2)
        mask = torch.arange(end) >= used
        self._run([ids[:end]], kv, [mask], torch.ones(int(mask.sum()), dtype=torch.bool))
        self._store_prefix([ids[:end]], kv, [used], [keys])
        return len(keys) - len(chunks)

    def _store_prefix(
        self, token_lists, kv: torch.Tensor, reused: list[int], keys_of: list[list[int]]
    ) -> None:
        writes, offset = [], 0
        for ids, used, keys in zip(token_lists, reused, keys_of, strict=False):
            for n in range(used // self.prefix_chunk, len(keys)):
                start = offset + n * self.prefix_chunk
                writes.append((keys[n], kv[:, :, start : start + self.prefix_chunk], None))
            offset += len(ids)
        self._write_back(writes)

    def _write_back(self, blocks: list[tuple[int, torch.Tensor, int | None]]) -> None:
        """Queue ``(key, [2, L, T, H, D] kv, item id or None)`` for the store (packed there)."""
        if not blocks:
            return
        future = self._writer.submit(self._put, blocks)
        with self._pending_lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]

    def _put(self, blocks: list[tuple[int, torch.Tensor, int | None]]) -> None:
        try:
            self.store.batched_put(
                [(key, blockkv.pack(kv, key)) for key, kv, _ in blocks],
                placement=[item for _, _, item in blocks],
            )
        except Exception:  # a store must not raise; if one does, the blocks are simply not cached
            log.exception("writing %d blocks back to the store failed", len(blocks))

    def flush(self) -> None:
        """Wait until every queued write-back has reached the store."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Finish queued write-backs and stop the writer thread (the store stays open)."""
        self.flush()
        self._writer.shutdown(wait=True)

    # ---- shared -----------------------------------------------------------------------------
    def _run(self, token_lists: list[list[int]], kv, masks, pinned, narrowing=None):
        lengths = [len(ids) for ids in token_lists]
        cu_k = torch.tensor([0] + lengths).cumsum(0)
        selected = torch.cat(
            [torch.nonzero(m).flatten() + int(start) for m, start in zip(masks, cu_k[:-1], strict=False)]
        )
        cu_q = torch.tensor([0] + [int(m.sum()) for m in masks]).cumsum(0)
        batch = PackedBatch(
            kv,
            torch.cat([torch.arange(n) for n in lengths]),
            torch.tensor([t for ids in token_lists for t in ids]),
            cu_k,
            selected,
            cu_q,
            pinned,
        )
        return run_selected(self.view, batch.to(self.view.device), narrowing, self.backend)

    def _scored(self, hidden, label_ids, stats) -> list[Scored]:
        return [
            Scored(
                label_logits(self.ranker.model, hidden[i : i + 1], torch.tensor(lab, device=hidden.device))[
                    0
                ].cpu(),
                s,
            )
            for i, (lab, s) in enumerate(zip(label_ids, stats, strict=False))
        ]


def _kinds_lengths(prompt: RenderedPrompt) -> tuple[list[str], list[int]]:
    return [b.kind for b in prompt.blocks], [len(b.token_ids) for b in prompt.blocks]


def _count_source(figures: CacheStats, nodes: set, read: Read | None, kv: torch.Tensor) -> None:
    if read is None:
        return
    if read.source == LOCAL:
        figures.local_hits += 1
    elif read.source == REMOTE:
        figures.remote_bytes += kv.numel() * kv.element_size()
        nodes.add(read.node)
