"""Serving: the batcher (continuous batching over the engine), the OpenAI-compatible API, the terminal chat."""
