"""Serving: an OpenAI-compatible HTTP API (FastAPI + uvicorn) with continuous batching.

`ServedModel(model, tokenizer, name)` + `create_app(served, api_key=, extra_routes=)` give the app;
`serve_forever(app, host, port)` runs it with a graceful SIGTERM. `Engine` is the decode loop.
Sits above evaluate/interop and beside rag; only recipes and the CLI import it.
"""

from lmforge.serve.app import ApiError, ServedModel, begin_draining, create_app, in_flight
from lmforge.serve.engine import Engine, Finished, QueueFull, Request, ShuttingDown, apply_repetition_penalty
from lmforge.serve.server import DrainingServer, serve_forever

__all__ = [
    "ApiError", "DrainingServer", "Engine", "Finished", "QueueFull", "Request", "ServedModel", "ShuttingDown",
    "apply_repetition_penalty", "begin_draining", "create_app", "in_flight", "serve_forever",
]
