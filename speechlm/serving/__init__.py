"""HTTP serving: an OpenAI-compatible transcription API with dynamic batching and a web page (`speechlm serve`)."""

from .app import APIError, ServerSettings, create_app
from .batcher import DynamicBatcher

__all__ = ["APIError", "DynamicBatcher", "ServerSettings", "create_app"]
