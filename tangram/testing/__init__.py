"""Test helpers that run as real processes: ``tangram.testing.engine``, an emulator of
an OpenAI-compatible inference server (vLLM's and SGLang's documented surface), for the
gateway's tests and benchmark without a GPU or model weights."""
