"""Experiments that are not product features (see README.md here); not installed with rcllm_sdk."""
