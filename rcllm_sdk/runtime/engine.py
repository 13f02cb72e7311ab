"""Score rendered prompts from cached block KV (``rcllm``) or cached token prefixes (``prefix``).

``rcllm``: fetch each system/user/item block's canonical KV (the engine's hot-block cache,
then the store; misses are computed and written back), assemble them in prompt order, rotate
keys to their real positions, then run the policy's selected tokens through every layer. A
miss is computed at its canonical place like any stored block, so a ranking never depends on
what happened to be cached. A prompt too short for reuse to pay (``guard.CostModel``) runs
full prefill instead; its ``CacheStats.fallback_full`` says so.

``prefix``: the prefix-caching baseline (``prefix.PrefixCaching``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rcllm_sdk.kernels.attention import resolve_attention

from ..cache.base import LOCAL, REMOTE, Read
from ..errors import InvariantError
from ..model.scoring import label_logits, score_full
from ..prompt.renderer import SYSTEM, RenderedPrompt
from ..types import CacheStats
from . import blockkv, transfer
from .guard import CostModel, prompt_shape
from .hot_blocks import HotBlocks
from .model_view import ModelView, RopeTable
from .policies import DEFAULT_POLICY, FRESH_KINDS, Policy, fresh_ranges, parse_policy
from .precompute import compute_blocks, compute_system, empty_kv
from .prefix import PrefixCaching
from .runner import Narrowing, PackedBatch, run_selected

log = logging.getLogger("rcllm_sdk.runtime")

HOT_BLOCK_BYTES = 256 << 20  # default bound of the decoded-block cache


@dataclass(slots=True)
class Scored:
    """Label logits of one prompt (``[K]``) and what the cache did for it."""

    logits: torch.Tensor
    cache: CacheStats


class BlockEngine(PrefixCaching):
    """Cached-KV scoring for one ranker and one block store. Safe to share between threads.

    ``backend``: attention backend (``auto`` | ``torch`` | ``triton``), resolved once here.
    ``guard``: True (default) runs full prefill where the cost model, measured on this model
    by ``calibrate_guard()`` (or when the engine first scores), predicts reuse cannot pay; a
    ``CostModel`` uses that one; False always reuses (benchmarks of pure reuse).
    ``hot_block_bytes``: bound of the decoded block cache (0: off).
    """

    def __init__(
        self,
        ranker,
        store,
        policy: str | Policy = DEFAULT_POLICY,
        backend: str = "auto",
        prefix_chunk: int = 16,
        guard: bool | CostModel = True,
        hot_block_bytes: int = HOT_BLOCK_BYTES,
    ):
        self.ranker, self.store, self.prefix_chunk = ranker, store, prefix_chunk
        self.policy = parse_policy(policy)
        self.view = ModelView.of(ranker.model)
        self.attention = resolve_attention(backend, self.view.device)
        self.inv_freq = self.view.base.rotary_emb.inv_freq
        self.rope_table = RopeTable(self.inv_freq)
        self.hot = HotBlocks(hot_block_bytes)
        self.guard, self.cost_model = guard is not False, guard if isinstance(guard, CostModel) else None
        self._calibrate_lock = threading.Lock()
        # Write-back runs beside the request, as LMCache stores after prefill: a request's
        # logits never wait for the store. ``flush()`` waits for what was queued.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcllm-kv-writeback")
        self._pending: list[Future] = []
        self._pending_lock = threading.Lock()

    # ---- rcllm ------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self, prompts: list[RenderedPrompt], label_ids: list[list[int]], policy: Policy | None = None
    ) -> list[Scored]:
        """Rank with reused block KV and the policy's selective recompute (full prefill for the
        prompts the guard sends there)."""
        policy = policy or self.policy
        layouts = [_kinds_lengths(p) for p in prompts]
        reuse = self._reuse_pays(layouts, policy)
        if all(reuse):
            return self._score_reuse(prompts, label_ids, layouts, policy)
        out: list[Scored | None] = [None] * len(prompts)
        for flag, score in ((True, self._score_reuse), (False, self._score_full)):
            rows = [i for i, r in enumerate(reuse) if r == flag]
            if rows:
                pick = lambda xs, rows=rows: [xs[i] for i in rows]  # noqa: E731
                for i, s in zip(
                    rows, score(pick(prompts), pick(label_ids), pick(layouts), policy), strict=True
                ):
                    out[i] = s
        return out

    def _score_reuse(self, prompts, label_ids, layouts, policy: Policy) -> list[Scored]:
        found, computed, reads = self.block_kv(
            [b for p in prompts for b in p.blocks if b.kind not in FRESH_KINDS]
        )
        kv, stats = self.assemble(prompts, found, computed, reads)
        batch = self._plan_batch(prompts, layouts, policy, kv)
        narrowing = Narrowing(policy.ratio, policy.check_layer) if policy.name == "deviation" else None
        hidden, rows = run_selected(self.view, batch, self.attention, narrowing)
        for s, n, p in zip(stats, rows.tolist(), prompts, strict=True):
            s.recomputed_fraction = n / p.text_length
        return self._scored(hidden, label_ids, stats)

    def _score_full(self, prompts, label_ids, layouts, policy: Policy) -> list[Scored]:
        """Full prefill (the plain HF forward, as ``full`` mode) for prompts reuse cannot speed up."""
        pad = getattr(self.ranker.tokenizer, "pad_token_id", None)
        scores = score_full(self.ranker.model, [p.input_ids for p in prompts], label_ids, pad)
        return [Scored(s.cpu(), CacheStats(fallback_full=True)) for s in scores]

    def _reuse_pays(self, layouts, policy: Policy) -> list[bool]:
        if not self.guard:
            return [True] * len(layouts)
        model = self.cost_model or self.calibrate_guard()
        shapes = [prompt_shape(kinds, lengths, policy, self.view.n_layers) for kinds, lengths in layouts]
        return [model.reuse_pays(s.tokens, s.recomputed, s.blocks) for s in shapes]

    def calibrate_guard(self) -> CostModel:
        """The guard's cost model, measured now unless this engine (or another in this process
        with the same model, attention backend and policy) already has one."""
        with self._calibrate_lock:
            if self.cost_model is None:
                from .calibrate import calibrate  # lazy: only engines that guard need it

                self.cost_model = calibrate(self)
                log.info("reuse guard cost model: %s", self.cost_model)
        return self.cost_model

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
        pieces, shifts, stats = [], [], []
        for prompt in prompts:
            stats.append(self._layout(prompt, found, computed, reads or {}, pieces, shifts))
        kv = self._gather(pieces)
        self._shift(kv, shifts)
        return kv, stats

    def _layout(self, prompt, found, computed, reads, pieces: list, shifts: list) -> CacheStats:
        """Append the prompt's block KV (or its fresh length) and ``(shift, tokens)`` runs."""
        system_len, figures, nodes = (
            len(prompt.blocks[0].token_ids),
            CacheStats(recomputed_fraction=0.0),
            set(),
        )
        for block in prompt.blocks:
            n, kv = len(block.token_ids), found.get(block.content_hash)
            if kv is None:
                pieces.append(n)
                shifts.append((0, n))
                continue
            if block.content_hash in computed:
                figures.misses += 1
            else:
                figures.hits += 1
                figures.kv_bytes_read += kv.numel() * kv.element_size()
                _count_source(figures, nodes, reads.get(block.content_hash), kv)
            pieces.append(kv)
            shifts.append((0 if block.kind == SYSTEM else block.start - system_len, n))
        figures.nodes_touched = len(nodes)
        return figures

    def _gather(self, pieces: list) -> torch.Tensor:
        """One concatenation of block KV and zero placeholders (ints: fresh lengths)."""
        longest = max((p for p in pieces if isinstance(p, int)), default=0)
        zeros = empty_kv(self.view, longest)
        return torch.cat([zeros[:, :, :p] if isinstance(p, int) else p for p in pieces], dim=2)

    def _shift(self, kv: torch.Tensor, shifts: list[tuple[int, int]]) -> None:
        """Rotate every layer's keys by their run's shift, in one batched op (``kv[0]: [L, N, H, D]``)."""
        deltas = torch.repeat_interleave(
            torch.tensor([d for d, _ in shifts]), torch.tensor([n for _, n in shifts])
        )  # [N]
        kv[0] = self.rope_table.rotate(kv[0], deltas.to(self.view.device))

    def _plan_batch(self, prompts, layouts, policy: Policy, kv: torch.Tensor) -> PackedBatch:
        """Positions, token ids, offsets, selected and pinned rows of the packed batch."""
        selected, pinned, cu_q, positions, offset = [], [], [0], [], 0
        for prompt, layout in zip(prompts, layouts, strict=True):
            fresh = {i for start, end in fresh_ranges(*layout) for i in range(start, end)}
            rows = [i for start, end in policy.selected_ranges(*layout) for i in range(start, end)]
            selected += [offset + i for i in rows]
            pinned += [i in fresh for i in rows]
            cu_q.append(cu_q[-1] + len(rows))
            positions += range(prompt.text_length)
            offset += prompt.text_length
        cu_k = [0]
        for p in prompts:
            cu_k.append(cu_k[-1] + p.text_length)
        ids = [t for p in prompts for t in p.input_ids]
        batch = PackedBatch(
            kv, *(torch.tensor(x) for x in (positions, ids, cu_k, selected, cu_q)), torch.tensor(pinned)
        )
        return batch.to(self.view.device)

    def block_kv(self, blocks) -> tuple[dict[int, torch.Tensor], set[int], dict[int, Read]]:
        """Canonical KV of every distinct block (hot cache, store hits; misses computed and
        written back), the hashes that were computed, and where each stored one was read from."""
        unique = list({b.content_hash: b for b in blocks}.values())
        systems = [b for b in unique if b.kind == SYSTEM]
        if len(systems) != 1:
            raise InvariantError(f"one system block per batch expected, got {len(systems)}")
        found = self.hot.get_many([b.content_hash for b in unique])
        reads = {key: Read(kv, LOCAL) for key, kv in found.items()}
        stored, stored_reads = self._fetch([b for b in unique if b.content_hash not in found])
        self.hot.put_many(stored)
        found.update(stored)
        reads.update(stored_reads)
        missing = [b for b in unique if b.content_hash not in found]
        if missing:
            found.update(self.compute_and_store(missing, found.get(systems[0].content_hash)))
        return found, {b.content_hash for b in missing}, reads

    def _fetch(self, blocks) -> tuple[dict[int, torch.Tensor], dict[int, Read]]:
        if not blocks:
            return {}, {}
        got = self._read(blocks)
        return self._unpack_all(blocks, got), {b.content_hash: r for b, r in zip(blocks, got, strict=True)}

    def _read(self, blocks) -> list[Read]:
        return self.store.batched_read(
            [b.content_hash for b in blocks], placement=[b.item_id for b in blocks]
        )

    def _unpack_all(self, blocks, reads: list[Read]) -> dict[int, torch.Tensor]:
        """Validated ``[2, L, T, H, D]`` KV on the runner's device, by hash (bad values are
        dropped), moved there in one transfer."""
        v, keys, kvs = self.view, [], []
        for block, read in zip(blocks, reads, strict=True):
            key = block.content_hash
            kv = blockkv.unpack(
                read.value, key, len(block.token_ids), v.n_layers, v.n_kv_heads, v.head_dim, v.dtype
            )
            if kv is None and read.value is not None:
                log.warning(
                    "block %016x: stored KV does not match it (shape, dtype or header); recomputing", key
                )
            if kv is not None:
                keys.append(key)
                kvs.append(kv)
        moved = transfer.to_device(kvs, v.device)
        # contiguous: a copy on a CPU runner too, as the store may reuse its buffer
        return {key: kv.contiguous() for key, kv in zip(keys, moved, strict=True)}

    def compute_and_store(self, blocks, system_kv: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Compute blocks at their canonical positions and queue them for the store (one write-back)."""
        computed = self.compute(blocks, system_kv)
        self.hot.put_many(computed)
        items = {b.content_hash: b.item_id for b in blocks}
        self._write_back([(key, kv, items[key]) for key, kv in computed.items()])
        return computed

    @torch.inference_mode()
    def compute(self, blocks, system_kv: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Canonical KV of blocks (``[2, L, T, H, D]`` by content hash). System blocks need
        nothing before them; every other block needs its system block's KV (``system_kv``, or
        the system block computed in this call)."""
        computed = {
            b.content_hash: compute_system(self.view, list(b.token_ids), self.attention)
            for b in blocks
            if b.kind == SYSTEM
        }
        others = [b for b in blocks if b.kind != SYSTEM]
        if others:
            system_kv = next(iter(computed.values()), None) if system_kv is None else system_kv
            if system_kv is None:
                raise InvariantError("user/item blocks are computed after the system block: pass its KV")
            kvs = compute_blocks(self.view, system_kv, [list(b.token_ids) for b in others], self.attention)
            computed.update({b.content_hash: kv for b, kv in zip(others, kvs, strict=True)})
        return computed

    # ---- write-back -------------------------------------------------------------------------
    def _write_back(self, blocks: list[tuple[int, torch.Tensor, int | None]]) -> None:
        """Queue ``(key, [2, L, T, H, D] kv, item id or None)`` for the store (packed there)."""
        if not blocks:
            return
        future = self._writer.submit(self._put, blocks)
        with self._pending_lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]

    def _put(self, blocks: list[tuple[int, torch.Tensor, int | None]]) -> None:
        try:
            on_host = transfer.to_host([kv for _, kv, _ in blocks])
            self.store.batched_put(
                [(key, blockkv.pack(kv, key)) for (key, _, _), kv in zip(blocks, on_host, strict=True)],
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
    def _scored(self, hidden: torch.Tensor, label_ids, stats) -> list[Scored]:
        """``hidden [B, hidden]`` -> each prompt's ``[K]`` label logits on the CPU."""
        return [
            Scored(
                label_logits(self.ranker.model, hidden[i : i + 1], torch.tensor(lab, device=hidden.device))[
                    0
                ].cpu(),
                s,
            )
            for i, (lab, s) in enumerate(zip(label_ids, stats, strict=True))
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
