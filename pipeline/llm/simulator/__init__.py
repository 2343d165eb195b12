"""The Anthropic-compatible LLM simulator: protocol, asgi, stats, app (server) and cli."""
