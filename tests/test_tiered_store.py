"""A replica's bounded local tier over a shared store (``open_store(..., tier_blocks=N)``)."""

from __future__ import annotations

import torch

from rcllm_sdk.cache import open_store
from rcllm_sdk.cache.base import LOCAL, MISS, REMOTE
from rcllm_sdk.cache.tiered import TieredStore


def _kv(seed: int) -> torch.Tensor:
    return torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(seed))


def test_two_replicas_share_the_store_and_keep_their_own_bounded_tiers():
    a = open_store("memory://shared-tier", "ns", tier_blocks=2)
    b = open_store("memory://shared-tier", "ns", tier_blocks=2)
    assert isinstance(a, TieredStore)
    a.batched_put([(1, _kv(1)), (2, _kv(2)), (3, _kv(3))])  # the tier keeps the last two
    reads = a.batched_read([1, 2, 3, 4])
    assert [r.source for r in reads] == [REMOTE, LOCAL, LOCAL, MISS]
    assert all(torch.equal(r.value, _kv(k)) for k, r in zip((1, 2, 3), reads, strict=False))
    assert b.batched_read([3])[0].source == REMOTE  # the other replica's write, from the store
    assert b.batched_read([3])[0].source == LOCAL  # now in b's own tier
    assert [r.source for r in a.batched_read([2])] == [REMOTE]  # 1 and 3 pushed 2 out (LRU)
    assert b.batched_contains([1, 4]) == [True, False] and a.stats.puts == 3


def test_a_value_read_from_the_tier_is_a_copy():
    store = open_store("memory://", "ns", tier_blocks=4)
    store.put(7, _kv(7))
    store.get(7).zero_()
    assert torch.equal(store.get(7), _kv(7))
