"""Replica routing policies (planning code): turn order, load, block affinity with its
imbalance fallback, dead replicas; affinity keeps more of a Zipf stream's blocks resident."""

from __future__ import annotations

import numpy as np
import pytest

from rcllm_sdk.errors import ConfigError, Overloaded
from rcllm_sdk.serving.routing import ReplicaState, Router


def _router(policy, n=2, capacity=100, **kw):
    return Router([ReplicaState(f"r{i}", capacity) for i in range(n)], policy, **kw)


def test_round_robin_takes_turns_and_least_loaded_takes_the_idlest():
    rr = _router("round_robin", 3)
    assert [rr.pick().name for _ in range(6)] == ["r0", "r1", "r2", "r0", "r1", "r2"]
    ll = _router("least_loaded", 3)
    ll.replicas[0].in_flight, ll.replicas[1].in_flight, ll.replicas[2].in_flight = 3, 1, 2
    chosen = ll.pick()
    assert chosen.name == "r1" and chosen.in_flight == 2
    ll.done(chosen)
    assert chosen.in_flight == 1


def test_affinity_follows_resident_blocks_until_the_load_is_too_uneven():
    router = _router("affinity", imbalance=3)
    router.replicas[1].touch({"u1", "i1", "i2"})
    assert router.pick(frozenset({"u1", "i1", "i2", "i9"})).name == "r1"
    router.replicas[1].in_flight = 5  # spread 5 > 3: the least loaded wins despite affinity
    assert router.pick(frozenset({"u1", "i1"})).name == "r0"


def test_dead_replicas_are_skipped_and_none_left_is_overloaded():
    router = _router("affinity")
    router.replicas[0].touch({"a"})
    router.mark_dead(router.replicas[0])
    assert {router.pick(frozenset({"a"})).name for _ in range(4)} == {"r1"}
    with pytest.raises(Overloaded):
        router.pick(frozenset({"a"}), exclude={"r1"})
    with pytest.raises(ConfigError):
        Router([], "affinity")
    with pytest.raises(ConfigError):
        _router("random")


def _resident_share(policy: str) -> float:
    """Share of a Zipf request stream's blocks already resident where each request is sent
    (requests finish at once: no load term), two replicas whose tiers hold 10% of the blocks."""
    rng = np.random.default_rng(0)
    users = rng.zipf(1.3, 3000) % 200
    router = _router(policy, capacity=int(0.1 * 200 * 6))
    hits = total = 0
    for user in users:
        blocks = frozenset({("u", int(user))} | {("i", int(user) * 7 % 300 + j) for j in range(5)})
        resident = {r.name: sum(1 for b in blocks if b in r.resident) for r in router.replicas}
        replica = router.pick(blocks)  # records the blocks as resident there
        router.done(replica)
        hits, total = hits + resident[replica.name], total + len(blocks)
    return hits / total


def test_affinity_keeps_more_blocks_resident_than_round_robin():
    assert _resident_share("affinity") > _resident_share("round_robin")
