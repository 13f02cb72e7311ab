"""rcllm_sdk: LLM-based recommendation with block-structured prompts.

Quick start:
    >>> from rcllm_sdk import RcRecommender
    >>> rec = RcRecommender.from_feature_store("feature_repo/")
    >>> rec.recommend(user_id=42, k=10)
"""

import os

# LMCache sends anonymous usage reports unless told not to; set before any LMCache import.
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time

from .errors import (  # noqa: E402
    ConfigError,
    DataFormatError,
    EmptyHistoryError,
    FeatureRepoError,
    ModelLoadError,
    NotEnoughCandidatesError,
    RcLLMError,
    UnknownUserError,
)
from .types import CacheStats, Recommendation  # noqa: E402


def __getattr__(name):  # keep `import rcllm_sdk` light: torch and Feast load on first use
    if name == "RcRecommender":
        from .recommender import RcRecommender

        return RcRecommender
    if name == "RecommenderConfig":
        from .config import RecommenderConfig

        return RecommenderConfig
    raise AttributeError(name)


__all__ = [
    "RcRecommender",
    "RecommenderConfig",
    "Recommendation",
    "CacheStats",
    "RcLLMError",
    "ConfigError",
    "DataFormatError",
    "EmptyHistoryError",
    "FeatureRepoError",
    "ModelLoadError",
    "NotEnoughCandidatesError",
    "UnknownUserError",
]
