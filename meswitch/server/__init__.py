"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a Switch, with automatic routing.

`create_app` is imported on first use, so that light modules of this package (conversations, the
Ray Serve coordinator) load without the runtime and torch."""


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'meswitch.server' has no attribute {name!r}")


__all__ = ["create_app"]
