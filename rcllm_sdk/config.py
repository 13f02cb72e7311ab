"""Recommender configuration with one documented precedence:

    defaults  <  YAML file (``config_file=``)  <  ``RCLLM_*`` environment  <  keyword arguments

Environment names are the upper-cased field names, e.g. ``RCLLM_CANDIDATES=30``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError
from .runtime.policies import DEFAULT_POLICY, parse_policy

COLD_START = ("raise", "popular")
MODES = ("rcllm", "prefix", "full")
ATTENTION = ("auto", "torch", "triton")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class RecommenderConfig:
    """Serving settings.

    Attributes:
        candidates: how many items the retriever hands to the ranker (K labels in the prompt).
        cold_start: ``raise`` (UnknownUserError / EmptyHistoryError) or ``popular`` (most popular items).
        batch_size: prompts per forward in ``recommend_batch``.
        threads: torch CPU threads (0 = leave torch's default).
        mode: ``rcllm`` (reuse cached block KV, recompute the policy's tokens), ``prefix``
            (reuse the longest cached token prefix, compute the rest) or ``full`` (the plain HF
            forward over the whole prompt, caching nothing).
        policy: which tokens ``rcllm`` recomputes (``full``, ``none``, ``block_head:K``,
            ``deviation:RATIO[:LAYER]``; see ``rcllm_sdk.runtime.policies``).
        store: where block KV lives: ``local://`` (LMCache CPU tier, in process), ``fs:///abs/dir``,
            ``lm://host:port``, ``redis://host:port``, ``cluster:///abs/cluster.json`` (items sharded
            over several nodes, see ``rcllm_sdk.cache.cluster``) or ``memory://``.
        tier_blocks: 0 (default) serves ``store`` as it is; N > 0 keeps an LRU of N blocks in this
            process in front of it, as its only local copy (the store keeps no CPU copy and the
            engine no decoded-block cache): a serving replica's bounded local tier over a shared
            store (``rcllm_sdk.cache.tiered``).
        attention: ``auto`` (Triton kernel on CUDA, torch elsewhere), ``torch`` or ``triton``.
        prefix_chunk: tokens per cached chunk in ``prefix`` mode (vLLM's block size is 16).
        guard: in ``rcllm`` mode, run full prefill for a prompt too short for reuse to pay (a
            cost model measured on the ranker when the engine first scores; the result says so:
            ``mode`` "full", ``cache.fallback_full``). Off: always reuse.
        device: where the ranker runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present).
        dtype: the ranker's precision: ``auto`` (bfloat16 on CUDA where the recipe allows it,
            float32 otherwise), ``float32``, ``bfloat16`` or ``float16``.
    """

    candidates: int = 20
    cold_start: str = "raise"
    batch_size: int = 16
    threads: int = 0
    mode: str = "rcllm"
    policy: str = DEFAULT_POLICY
    store: str = "local://"
    tier_blocks: int = 0
    attention: str = "auto"
    prefix_chunk: int = 16
    guard: bool = True
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self):
        if self.candidates < 1:
            raise ConfigError(f"candidates must be >= 1, got {self.candidates}")
        if self.cold_start not in COLD_START:
            raise ConfigError(f"cold_start must be one of {COLD_START}, got {self.cold_start!r}")
        if self.batch_size < 1 or self.threads < 0:
            raise ConfigError("batch_size must be >= 1 and threads >= 0")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.tier_blocks < 0:
            raise ConfigError(f"tier_blocks must be >= 0, got {self.tier_blocks}")
        if self.prefix_chunk < 1:
            raise ConfigError(f"prefix_chunk must be >= 1, got {self.prefix_chunk}")
        if not DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        parse_policy(self.policy)  # raises ConfigError on a bad spec

    @classmethod
    def resolve(cls, config_file: str | Path | None = None, **overrides) -> RecommenderConfig:
        """Merge the four layers in precedence order; unknown keys are rejected."""
        values: dict = {}
        if config_file:
            values.update(read_yaml_mapping(Path(config_file), "config"))
        values.update(env_values("RCLLM_", {f.name for f in fields(cls)}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML settings file holds (``what`` names the settings in errors)."""
    import yaml

    if not path.exists():
        raise ConfigError(f"{what} file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {what} keys")
    return data


def env_values(prefix: str, names: Container[str]) -> dict:
    """``{name: text}`` of the ``<PREFIX><NAME>`` environment variables whose name is known."""
    found = {k[len(prefix) :].lower(): v for k, v in os.environ.items() if k.startswith(prefix)}
    return {k: v for k, v in found.items() if k in names}


def parse_bool(name: str, text: str) -> bool:
    """YAML/environment text as a bool (``bool("false")`` would be True)."""
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"setting {name}={text!r} is not a valid bool (true or false)")
    return value in ("1", "true", "yes", "on")


def _coerce(cls, name: str, value):
    default = getattr(cls(), name)
    if isinstance(default, bool) and isinstance(value, str):
        return parse_bool(name, value)
    try:
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {name}={value!r} is not a valid {type(default).__name__}") from exc
