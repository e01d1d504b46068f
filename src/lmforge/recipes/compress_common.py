"""What `quantize`, `prune` and `distill` share: calibration and held-out text, and the report of what a
compression cost (quality) and bought (bytes, speed), measured against the original model.

Held-out text is the tail `val_fraction` of the token stream, the same tail `pretrain` holds out for validation
when it reads the same sources in the same order, so a model pre-trained by lmforge is scored on text it never saw.
Calibration windows come from the head of the stream, so they never overlap the held-out text.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.checkpoint import model_tensors
from lmforge.compress.storage import read_compression
from lmforge.data import STDLIB, read_documents, resolve_files
from lmforge.data.shards import TokenShard
from lmforge.errors import UserError
from lmforge.evaluate.harness import format_table
from lmforge.evaluate.metrics import perplexity
from lmforge.files import check_can_create
from lmforge.generate import SamplingConfig, generate
from lmforge.interop import is_hf_folder
from lmforge.models import CausalLM, Model
from lmforge.nn import Block
from lmforge.recipes.pretrain import PretrainConfig, batch_makers
from lmforge.tokenizer import Tokenizer
from lmforge.train import FAMILY_LOSSES, TrainConfig

REPORT_FILE = "compression_report.json"


@dataclass
class CompressData:
    """Text for calibration (GPTQ, Wanda, head/neuron importance) and for the held-out measurements."""

    sources: list[str] = field(default_factory=lambda: [STDLIB], metadata={
        "help": "files, folders or .jsonl; 'stdlib' = this Python's sources (pretrain's default)"})
    jsonl_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl files"})
    max_bytes: int | None = field(default=None, metadata={"help": "read at most this many characters"})
    shuffle_seed: int = field(default=0, metadata={"help": "order of files (pretrain's data.shuffle_seed)"})
    val_fraction: float = field(default=0.05, metadata={"help": "tail of the tokens held out (pretrain's default)"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration windows (GPTQ, Wanda, heads)"})
    heldout_tokens: int = field(default=32768, metadata={"help": "held-out tokens scored for perplexity"})
    decode_tokens: int = field(default=64, metadata={"help": "new tokens per timed greedy decode"})
    decode_batches: list[int] = field(default_factory=lambda: [1], metadata={"help": "batch sizes decode is timed at"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration windows"})

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("calibration_samples", "heldout_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise UserError(f"data.decode_batches={self.decode_batches} must be sizes >= 1")


# One tokenization per (data, tokenizer) and process. The entry keeps its tokenizer alive, so the id in the key
# can never be reused by another tokenizer while the entry exists.
_STREAMS: dict[tuple, tuple[Tokenizer, np.ndarray]] = {}


def token_stream(data: CompressData, tokenizer: Tokenizer) -> np.ndarray:
    """The sources as one token array, documents separated by EOS (or [SEP]) like pretrain's shard."""
    key = (tuple(data.sources), data.jsonl_field, data.max_bytes, data.shuffle_seed, id(tokenizer))
    if key not in _STREAMS:
        end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
        ids: list[int] = []
        docs = list(read_documents(resolve_files(data.sources, data.shuffle_seed), data.jsonl_field, data.max_bytes))
        for encoded in tokenizer.encode_batch(docs):
            ids += encoded + ([] if end is None else [end])
        if len(ids) < 4:
            raise UserError(f"data.sources={data.sources} hold {len(ids)} tokens; give more text")
        _STREAMS[key] = (tokenizer, np.asarray(ids, dtype=np.int64))
    return _STREAMS[key][1]


def _split(data: CompressData, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    tokens = token_stream(data, tokenizer)
    held = int(len(tokens) * data.val_fraction)
    return tokens[: len(tokens) - held], tokens[len(tokens) - held:]


def calibration_ids(data: CompressData, tokenizer: Tokenizer, length: int) -> torch.Tensor:
    """(calibration_samples, length) windows at seeded random offsets of the head of the stream."""
    head, _ = _split(data, tokenizer)
    if len(head) < length + 1:
        raise UserError(f"the calibration text has {len(head)} tokens, fewer than one window of {length}; give more "
                        "--data.sources text")
    starts = np.random.default_rng(data.seed).integers(0, len(head) - length, size=data.calibration_samples)
    return torch.from_numpy(np.stack([head[s:s + length] for s in starts]))


def heldout_ids(data: CompressData, tokenizer: Tokenizer) -> torch.Tensor:
    """The first `heldout_tokens` of the held-out tail."""
    _, tail = _split(data, tokenizer)
    if len(tail) < 2:
        raise UserError(f"the held-out tail has {len(tail)} tokens; give more text or a larger data.val_fraction")
    return torch.from_numpy(tail[: data.heldout_tokens].copy())


# -- inputs and outputs ---------------------------------------------------------------------------------------------
def previous_compression(model: str) -> dict[str, Any]:
    """The input checkpoint's own compression record (empty for a plain or Hugging Face folder), to merge."""
    if not Path(model).is_dir() or is_hf_folder(model):
        return {}
    return read_compression(model) or {}


def check_model_and_out(command: str, model: str, out: str, quantized_fix: str) -> dict[str, Any]:
    """Refuse missing or clashing --model/--out and a quantized input before anything loads; return the input's
    compression record."""
    if not model or not out:
        raise UserError(f"{command} needs --model CHECKPOINT --out FOLDER")
    if Path(out).resolve() == Path(model).resolve():
        raise UserError(f"--out '{out}' is the input model's folder; choose another --out")
    check_can_create(out, "--out")
    before = previous_compression(model)
    if "quantization" in before:
        raise UserError(f"'{model}' is already quantized ({before['quantization'].get('method')}); {quantized_fix}")
    return before


# -- measurements ---------------------------------------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything a checkpoint stores: parameters and quantized codes/scales (a tied head once)."""
    return sum(t.numel() * t.element_size() for t in model_tensors(model).values())


def logical_parameters(model: nn.Module) -> int:
    """Parameters the model computes with: a quantized layer counts the weights it stands for."""
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()) + sum(getattr(m, "quantized_parameters", 0) for m in model.modules())


def block_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among the full-precision weights of the transformer blocks' linear layers."""
    weights = [m.weight for block in model.modules() if isinstance(block, Block)
               for m in block.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def folder_bytes(folder: str | Path | None) -> int | None:
    """Bytes of the model's weight files (model.safetensors or its shards); a training checkpoint's optimizer
    state beside them is not the model."""
    if folder is None:
        return None
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors") if f.is_file())


@torch.inference_mode()
def heldout_quality(model: Model, tokenizer: Tokenizer, ids: torch.Tensor) -> dict[str, float]:
    """Causal: sliding-window perplexity. Masked / seq2seq: exp of the pre-training objective's mean loss on
    held-out batches (BERT's MLM, T5's span corruption), seeded, so two models see the same batches."""
    if isinstance(model, CausalLM):
        result = perplexity(model, ids)
        return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens}
    cfg = PretrainConfig(family=model.cfg.family, train=TrainConfig(batch_size=8, seed=1234, progress=False))
    shard = TokenShard(train=ids.numpy(), val=ids.numpy(), meta={})
    _, batches = batch_makers(cfg, model.cfg, shard, tokenizer)
    device = next(model.parameters()).device
    losses = [float(FAMILY_LOSSES[model.cfg.family](model, {k: v.to(device) for k, v in batches(i).items()}))
              for i in range(8)]
    nll = sum(losses) / len(losses)
    return {"perplexity": float(np.exp(nll)), "nll": nll, "tokens": 8 * 8 * model.cfg.context_length}


@torch.inference_mode()
def decode_speed(model: Model, prompt: list[int], new_tokens: int, batch: int, runs: int = 2) -> float | None:
    """Greedy tokens/s (all rows, EOS ignored so every call makes the same work), best of `runs` after a warm-up;
    None for a model that does not generate."""
    if not hasattr(model, "lm_head") or model.cfg.family == "masked":
        return None
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    generate(model, [prompt] * batch, SamplingConfig(max_new_tokens=2, temperature=0.0, stop_at_eos=False))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        generate(model, [prompt] * batch, sampling)
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def measure(model: Model, tokenizer: Tokenizer, data: CompressData, folder: str | Path | None) -> dict[str, Any]:
    """Size, quality and speed of one model."""
    ids = heldout_ids(data, tokenizer)
    prompt = ids[:16].tolist()
    room = model.cfg.context_length - len(prompt)
    params = logical_parameters(model)
    memory = weight_bytes(model)
    return {
        "parameters": params,
        "bytes_in_memory": memory,
        "bytes_on_disk": folder_bytes(folder),
        "bytes_per_parameter": memory / params,
        "block_sparsity": block_sparsity(model),
        **heldout_quality(model, tokenizer, ids),
        "decode_tokens_per_s": {str(b): decode_speed(model, prompt, min(data.decode_tokens, room), b)
                                for b in data.decode_batches},
    }


def compression_report(original: Model, compressed: Model, tokenizer: Tokenizer, data: CompressData, *,
                       original_folder: str | Path | None = None, compressed_folder: str | Path | None = None,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both models measured the same way, and the compressed one's changes relative to the original."""
    before = measure(original, tokenizer, data, original_folder)
    after = measure(compressed, tokenizer, data, compressed_folder)
    report: dict[str, Any] = {"original": before, "compressed": after, **(extra or {})}
    report["perplexity_change"] = after["perplexity"] / before["perplexity"] - 1
    report["memory_ratio"] = after["bytes_in_memory"] / before["bytes_in_memory"]
    report["decode_speedup"] = {b: (after["decode_tokens_per_s"][b] / before["decode_tokens_per_s"][b]
                                    if before["decode_tokens_per_s"][b] else None)
                                for b in before["decode_tokens_per_s"]}
    report["threads"] = torch.get_num_threads()
    return report


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def report_table(report: dict[str, Any]) -> str:
    rows = []
    for name in ("original", "compressed"):
        m = report[name]
        speeds = ", ".join(f"b{b}: {s:.0f}" for b, s in m["decode_tokens_per_s"].items() if s is not None) or "-"
        rows.append([name, f"{m['parameters']:,}", _mib(m["bytes_on_disk"]), _mib(m["bytes_in_memory"]),
                     f"{m['bytes_per_parameter']:.3f}", f"{m['perplexity']:.3f}", f"{m['block_sparsity']:.1%}",
                     speeds])
    headers = ["model", "parameters", "on disk", "in memory", "bytes/param", "perplexity", "sparsity", "decode tok/s"]
    speedups = ", ".join(f"b{b}: {s:.2f}x" for b, s in report["decode_speedup"].items() if s is not None) or "-"
    return (format_table(headers, rows) + f"\nperplexity {report['perplexity_change']:+.2%}, memory "
            f"{report['memory_ratio']:.3f}x, decode {speedups}")


def finish_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Print the table and write out_dir/compression_report.json (atomically: a whole file or the old one)."""
    print(report_table(report))
    path = Path(out_dir) / REPORT_FILE
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print(f"report -> {path}")
    return path
