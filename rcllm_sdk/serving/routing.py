"""Choosing a replica for a request (planning code: no torch, no Ray).

A router keeps one :class:`ReplicaState` per replica: requests in flight and an estimate of the
blocks resident in its bounded local tier (an LRU of the blocks of the requests it was sent,
sized like the tier, as a cache-aware router must estimate without asking). Policies:

- ``round_robin``: replicas in turn;
- ``least_loaded``: fewest requests in flight (ties: in turn);
- ``affinity``: the largest share of the request's blocks resident, minus ``load_weight`` per
  request in flight; when the in-flight spread exceeds ``imbalance`` it falls back to
  ``least_loaded`` so a popular replica cannot run away with the load.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from ..errors import ConfigError, Overloaded

POLICIES = ("round_robin", "least_loaded", "affinity")


@dataclass(slots=True)
class ReplicaState:
    """What the router knows of one replica."""

    name: str
    capacity: int = 4096  # blocks its local tier holds
    in_flight: int = 0
    alive: bool = True
    resident: OrderedDict = field(default_factory=OrderedDict)

    def touch(self, blocks: Iterable[Hashable]) -> None:
        """The replica served these blocks: they are its most recently used."""
        for block in blocks:
            self.resident.pop(block, None)
            self.resident[block] = None
        while len(self.resident) > self.capacity:
            self.resident.popitem(last=False)

    def share_resident(self, blocks: frozenset) -> float:
        return sum(1 for b in blocks if b in self.resident) / len(blocks) if blocks else 0.0


class Router:
    """Picks a replica per request with one of ``POLICIES``; tell it when a request starts
    (:meth:`pick`, or :meth:`choose` then :meth:`record`) and ends (:meth:`done`), and when a
    replica dies (:meth:`mark_dead`)."""

    def __init__(
        self,
        replicas: list[ReplicaState],
        policy: str = "affinity",
        load_weight: float = 0.5,
        imbalance: int = 2,
    ):
        if policy not in POLICIES:
            raise ConfigError(f"routing must be one of {POLICIES}, got {policy!r}")
        if not replicas:
            raise ConfigError("a router needs at least one replica")
        self.replicas, self.policy = replicas, policy
        self.load_weight, self.imbalance = load_weight, imbalance
        self._turn = itertools.count()

    def pick(self, blocks: frozenset = frozenset(), exclude: Iterable[str] = ()) -> ReplicaState:
        """:meth:`choose` a replica and :meth:`record` the request there."""
        chosen = self.choose(blocks, exclude)
        self.record(chosen, blocks)
        return chosen

    def choose(self, blocks: frozenset = frozenset(), exclude: Iterable[str] = ()) -> ReplicaState:
        """The replica for a request with ``blocks`` (nothing recorded). ``exclude``: replicas
        already tried (a retry)."""
        skip = set(exclude)
        alive = [r for r in self.replicas if r.alive and r.name not in skip]
        if not alive:
            raise Overloaded("no live replica left to route this request to; retry later")
        return self._choose(alive, blocks)

    def record(self, replica: ReplicaState, blocks: frozenset) -> None:
        """The request is in flight on ``replica`` and its blocks are resident there."""
        replica.in_flight += 1
        replica.touch(blocks)

    def done(self, replica: ReplicaState) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)

    def mark_dead(self, replica: ReplicaState) -> None:
        replica.alive, replica.in_flight = False, 0
        replica.resident.clear()

    def _choose(self, alive: list[ReplicaState], blocks: frozenset) -> ReplicaState:
        turn = next(self._turn)
        in_turn = alive[turn % len(alive) :] + alive[: turn % len(alive)]
        if self.policy == "round_robin":
            return in_turn[0]
        least = min(in_turn, key=lambda r: r.in_flight)
        if self.policy == "least_loaded" or not blocks:
            return least
        loads = [r.in_flight for r in alive]
        if max(loads) - min(loads) > self.imbalance:
            return least
        return max(in_turn, key=lambda r: r.share_resident(blocks) - self.load_weight * r.in_flight)
