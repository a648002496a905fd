"""The HTTP lease API (FastAPI under uvicorn)."""
