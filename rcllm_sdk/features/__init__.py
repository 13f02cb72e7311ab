"""Feast feature repo: definitions and the SDK's client."""

from .store import FeatureClient, check_online_store, init_repo

__all__ = ["FeatureClient", "check_online_store", "init_repo"]
