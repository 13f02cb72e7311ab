"""The prefix-caching baseline (vLLM/SGLang semantics), a mixin of ``BlockEngine``.

The prompt is cut into chunks of ``prefix_chunk`` tokens, each keyed by the hash of the whole
prefix up to its end; the longest run of stored chunks from the start is reused and everything
after it is computed by the same runner and attention path, then its full chunks are written back.
"""

from __future__ import annotations

import hashlib

import torch

from ..prompt.renderer import RenderedPrompt
from ..types import CacheStats
from . import blockkv, transfer
from .precompute import empty_kv
from .runner import PackedBatch, run_selected


class PrefixCaching:
    """``score_prefix`` and ``store_prefix`` over the engine's store, runner and write-back."""

    @torch.inference_mode()
    def score_prefix(self, prompts: list[RenderedPrompt], label_ids: list[list[int]]) -> list:
        """Rank with the longest cached token prefix reused and the rest computed."""
        chunk, stored, reused, stats, keys_of = self.prefix_chunk, [], [], [], []
        for prompt in prompts:
            ids = prompt.input_ids
            keys = self.prefix_keys(ids)
            chunks = self._prefix_chunks(self._stored_run(keys))
            used = min(len(chunks) * chunk, len(ids) - 1) // chunk * chunk if chunks else 0
            chunks = chunks[: used // chunk]
            stored.extend(chunks)
            reused.append(used)
            keys_of.append(keys)
            nbytes = sum(c.numel() * c.element_size() for c in chunks)
            stats.append(CacheStats(len(chunks), len(keys) - len(chunks), 0.0, nbytes))
        token_lists = [p.input_ids for p in prompts]
        kv = self._prefix_cache(token_lists, stored, reused)
        hidden, rows = self._run_suffixes(token_lists, kv, reused)
        self._store_prefix(token_lists, kv, reused, keys_of)
        for s, n, p in zip(stats, rows.tolist(), prompts, strict=True):
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

    def _stored_run(self, keys: list[int]) -> list[int]:
        """The keys of the longest run of stored chunks from the start."""
        run = []
        for key, present in zip(keys, self.store.batched_contains(keys) if keys else [], strict=True):
            if not present:
                break
            run.append(key)
        return run

    def _prefix_chunks(self, keys: list[int]) -> list[torch.Tensor]:
        chunks = []
        v = self.view
        for key, value in zip(keys, self.store.batched_get(keys) if keys else [], strict=True):
            kv = blockkv.unpack(value, key, self.prefix_chunk, v.n_layers, v.n_kv_heads, v.head_dim, v.dtype)
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
        chunks = self._prefix_chunks(self._stored_run(keys))
        used, end = len(chunks) * self.prefix_chunk, len(keys) * self.prefix_chunk
        if used == end:
            return 0
        kv = self._prefix_cache([ids[:end]], chunks, [used])
        self._run_suffixes([ids[:end]], kv, [used])
        self._store_prefix([ids[:end]], kv, [used], [keys])
        return len(keys) - len(chunks)

    def _prefix_cache(self, token_lists, chunks: list[torch.Tensor], reused: list[int]) -> torch.Tensor:
        """Packed ``[2, L, N, kv_heads, head_dim]`` cache: each prompt's reused chunks (moved to the
        device in one transfer, in prompt order), then zeros for the tokens to compute."""
        moved, pieces = iter(transfer.to_device(chunks, self.view.device)), []
        for ids, used in zip(token_lists, reused, strict=True):
            pieces += [next(moved) for _ in range(used // self.prefix_chunk)]
            pieces.append(empty_kv(self.view, len(ids) - used))
        return torch.cat(pieces, dim=2)

    def _run_suffixes(self, token_lists: list[list[int]], kv: torch.Tensor, reused: list[int]):
        """Run every token after each prompt's reused prefix (all pinned)."""
        lengths = [len(ids) for ids in token_lists]
        starts = [sum(lengths[:b]) for b in range(len(lengths))]
        selected = [s + i for s, n, used in zip(starts, lengths, reused, strict=True) for i in range(used, n)]
        batch = PackedBatch(
            kv,
            torch.tensor([i for n in lengths for i in range(n)]),
            torch.tensor([t for ids in token_lists for t in ids]),
            torch.tensor([0, *lengths]).cumsum(0),
            torch.tensor(selected),
            torch.tensor([0, *(n - used for n, used in zip(lengths, reused, strict=True))]).cumsum(0),
            torch.ones(len(selected), dtype=torch.bool),
        )
        return run_selected(self.view, batch.to(self.view.device), self.attention)

    def _store_prefix(
        self, token_lists, kv: torch.Tensor, reused: list[int], keys_of: list[list[int]]
    ) -> None:
        writes, offset = [], 0
        for ids, used, keys in zip(token_lists, reused, keys_of, strict=True):
            for n in range(used // self.prefix_chunk, len(keys)):
                start = offset + n * self.prefix_chunk
                writes.append((keys[n], kv[:, :, start : start + self.prefix_chunk], None))
            offset += len(ids)
        self._write_back(writes)
