"""The HTTP lease API (FastAPI under uvicorn): ``create_app`` and ``LiveServer``.

Both are imported on first use, so that ``tangram --help`` and ``tangram bench`` do not
pay for FastAPI."""

from __future__ import annotations

from typing import Any

__all__ = ["LiveServer", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from tangram.server.app import create_app

        return create_app
    if name == "LiveServer":
        from tangram.server.run import LiveServer

        return LiveServer
    raise AttributeError(name)
