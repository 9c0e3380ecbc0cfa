"""The HTTP API: a FastAPI app built by a factory, and the Ray Serve deployment around it."""
