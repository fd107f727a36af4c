"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a Switch, with automatic routing."""
from .app import create_app

__all__ = ["create_app"]
