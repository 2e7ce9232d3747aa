"""The HTTP edge: FastAPI routes that translate requests into commands and queries."""
