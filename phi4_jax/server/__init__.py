"""The OpenAI-compatible server's layer: request and response shapes over the engine (HTTP lives here only)."""
