"""The HTTP lease API (FastAPI under uvicorn): ``create_app`` and ``LiveServer``."""

from tangram.server.app import create_app
from tangram.server.run import LiveServer

__all__ = ["LiveServer", "create_app"]
