"""Serving over HTTP: the admission scheduler, the FastAPI app and multi-replica routing."""
