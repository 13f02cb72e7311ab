"""Feature definitions for the `feast` CLI (`feast -c feature_repo plan`); the SDK applies the
same objects itself during `rcllm ingest`."""

from pathlib import Path

from rcllm_sdk.features.definitions import feature_definitions

user, item, user_history, item_features = feature_definitions(Path(__file__).parent / "data")
