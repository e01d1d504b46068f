"""`lmforge serve`: an OpenAI-compatible server (completions, chat, embeddings, models, health) for one
checkpoint or Hugging Face folder, with continuous batching, on loopback unless told otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.interop import load, load_adapter

if TYPE_CHECKING:  # FastAPI and uvicorn load only when `lmforge serve` runs, not for every `lmforge` command
    from fastapi import FastAPI


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder (required)"})
    adapter: str | None = field(default=None, metadata={
        "help": "fine-tune output to apply to --model: lmforge method state (lora, prompt, ...) or a peft adapter"})
    name: str | None = field(default=None, metadata={"help": "model id clients ask for (default: the folder name)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the server"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY'"})
    max_batch: int = field(default=16, metadata={"help": "sequences decoded together (KV-cache slots)"})
    max_queue: int = field(default=256, metadata={"help": "requests that may wait for a slot; more get 429"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    grace_s: float = field(default=300.0, metadata={"help": "on SIGTERM, wait this long for requests in flight"})
    index: str | None = field(default=None, metadata={
        "help": "RAG index folder (from `lmforge rag index`): adds POST /v1/rag/answer, answered by this model"})

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_queue < 0:
            raise UserError(f"max_queue={self.max_queue} must be >= 0")
        if not 1 <= self.port <= 65535:
            raise UserError(f"port={self.port} is not a TCP port; use 1..65535")


def build_app(cfg: ServeConfig, extra_routes: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """Load the model (plus adapter) and build the app, without serving it."""
    from lmforge.serve import ServedModel, create_app

    if not cfg.model:
        raise UserError("no model given; pass --model CHECKPOINT_FOLDER")
    rag = None
    if cfg.index:  # a bad index fails before the model loads
        from lmforge.recipes.serve_rag import rag_routes

        rag = rag_routes(cfg.index, pick_device(cfg.device))
    model, tokenizer = load(cfg.model, pick_device(cfg.device))
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter).eval()
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; serving needs one")
    name = cfg.name or Path(cfg.model).resolve().name
    served = ServedModel(model, tokenizer, name, cfg.max_batch, cfg.max_queue, aliases={cfg.model})
    def add_routes(app: FastAPI) -> None:
        for add in (rag, extra_routes):
            if add is not None:
                add(app)

    return create_app(served, api_key=cfg.api_key, extra_routes=add_routes)


def run_serve(cfg: ServeConfig, extra_routes: Callable[[FastAPI], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; one log line per request on stderr."""
    from lmforge.serve import serve_forever

    app = build_app(cfg, extra_routes)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log = logging.getLogger("lmforge.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    served = app.state.served
    print(f"serving '{served.name}' ({type(served.model).__name__}) on http://{cfg.host}:{cfg.port}/v1 "
          f"(max_batch {cfg.max_batch}, max_queue {cfg.max_queue})", file=sys.stderr, flush=True)
    serve_forever(app, cfg.host, cfg.port, cfg.grace_s)
