"""Feast feature repo: definitions and the SDK's client."""

from .store import FeatureClient, init_repo

__all__ = ["FeatureClient", "init_repo"]
