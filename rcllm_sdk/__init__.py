"""rcllm_sdk: LLM-based recommendation with block-structured prompts.

Quick start:
    >>> from rcllm_sdk import RcRecommender
    >>> rec = RcRecommender.from_feature_store("feature_repo/")
    >>> rec.recommend(user_id=42, k=10)
"""

# Importing the package changes no process-wide setting: models load with local_files_only=True,
# and LMCache's usage reporting is switched off by rcllm_sdk.cache.lmcache_compat, which every
# LMCache import goes through.
from .errors import (
    ConfigError,
    DataFormatError,
    EmptyHistoryError,
    FeatureRepoError,
    InvalidRequestError,
    ModelLoadError,
    NotEnoughCandidatesError,
    RcLLMError,
    UnknownUserError,
)
from .types import CacheStats, Recommendation


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
    "InvalidRequestError",
    "ModelLoadError",
    "NotEnoughCandidatesError",
    "UnknownUserError",
]
