"""`lmforge quantize`: post-training quantization of a checkpoint into a compressed checkpoint folder, with a
report of what it cost in held-out perplexity and bought in bytes and decode speed.

Methods:
- fp16 / bf16: every floating tensor stored and run in half precision;
- int8: weight-only, per-output-channel absmax (memory, not speed, on a CPU);
- int8-dynamic: int8 weights and int8 activations quantized per call, on the CPU's int8 GEMM (speed);
- int4: group-wise asymmetric round-to-nearest (`--bits`, `--group_size`);
- nf4: QLoRA's 4-bit NormalFloat with double quantization (`--block_size`, `--double_quant`);
- gptq: GPTQ's second-order rounding into the int4 format at `--bits` 4 or 3, calibrated on `--data`.

Embeddings and the output head stay in full precision unless `--include_embeddings` / `--include_head`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.compress.storage import save_compressed
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import Model
from lmforge.recipes.compress_common import (
    CompressData,
    calibration_ids,
    check_model_and_out,
    compression_report,
    finish_report,
)
from lmforge.tokenizer import Tokenizer

HALF = {"fp16": "float16", "bf16": "bfloat16"}
METHODS = ("fp16", "bf16", "int8", "int8-dynamic", "int4", "nf4", "gptq")


@dataclass
class QuantizeConfig:
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder (required)"})
    method: str = field(default="int8-dynamic", metadata={"help": " | ".join(METHODS)})
    out: str = field(default="", metadata={"help": "folder for the quantized checkpoint (required)"})
    bits: int = field(default=4, metadata={"help": "int4 / gptq: bits per weight (gptq: 4 or 3)"})
    group_size: int = field(default=128, metadata={"help": "int4 / gptq: weights per scale along the input"})
    block_size: int = field(default=64, metadata={"help": "nf4: weights per absmax block"})
    double_quant: bool = field(default=True, metadata={"help": "nf4: quantize the block scales too"})
    damp: float = field(default=0.01, metadata={"help": "gptq: Hessian dampening, a fraction of its mean diagonal"})
    act_order: bool = field(default=True, metadata={"help": "gptq: quantize columns by descending Hessian diagonal"})
    include_embeddings: bool = field(default=False, metadata={"help": "quantize the token embeddings too"})
    include_head: bool = field(default=False, metadata={
        "help": "quantize the output head too (a tied head is untied first: it gets its own copy)"})
    report: bool = field(default=True, metadata={"help": "measure perplexity, bytes and decode speed against the "
                                                         "original and write compression_report.json"})
    device: str = field(default="cpu", metadata={"help": "where calibration and the report run: cpu | cuda | auto"})
    data: CompressData = field(default_factory=CompressData)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method='{self.method}' is not one of: {', '.join(METHODS)}")
        if self.method == "gptq" and self.bits not in (3, 4):
            raise UserError(f"bits={self.bits}: gptq quantizes to 4 or 3 bits; pass --bits 4 or --bits 3")
        if self.method == "int4" and not 2 <= self.bits <= 8:
            raise UserError(f"bits={self.bits} must be in [2, 8] for int4")
        if self.damp <= 0:
            raise UserError(f"damp={self.damp} must be > 0 (a small fraction such as 0.01)")


def format_options(cfg: QuantizeConfig) -> dict[str, Any]:
    """The options the chosen format takes."""
    if cfg.method in ("int4", "gptq"):
        return {"bits": cfg.bits, "group_size": cfg.group_size}
    if cfg.method == "nf4":
        return {"block_size": cfg.block_size, "double_quant": cfg.double_quant}
    return {}


def quantize(model: Model, cfg: QuantizeConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Quantize `model` in place; returns the quantization record (method, options, replaced layers)."""
    scope = {"include_embeddings": cfg.include_embeddings, "include_head": cfg.include_head}
    record: dict[str, Any] = {"method": cfg.method, **format_options(cfg), **scope}
    if cfg.method in HALF:
        model.to(getattr(torch, HALF[cfg.method]))
        return {**record, "dtype": HALF[cfg.method], "layers": {}}
    if cfg.method == "gptq":
        from lmforge.compress.gptq import gptq_quantize_model

        if tokenizer is None:
            raise UserError("gptq calibrates on text and this model has no tokenizer.json; give a model with one")
        calibration = calibration_ids(cfg.data, tokenizer, model.token_room)
        layers = gptq_quantize_model(model, calibration.to(next(model.parameters()).device), bits=cfg.bits,
                                     group_size=cfg.group_size, damp=cfg.damp, act_order=cfg.act_order,
                                     include_head=cfg.include_head)
        return {**record, "damp": cfg.damp, "act_order": cfg.act_order,
                "calibration": {"samples": len(calibration), "tokens": calibration.shape[1]}, "layers": layers}
    from lmforge.compress.quant import quantize_model

    return {**record, "layers": quantize_model(model, cfg.method, **scope, **format_options(cfg))}


def run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Load, quantize, save a compressed checkpoint, then (with --report) measure it against the original."""
    before = check_model_and_out("quantize", cfg.model, cfg.out, "quantize its full-precision original instead")
    original, tokenizer = load(cfg.model, pick_device(cfg.device))
    if cfg.report and tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json, so the report cannot read text; pass --report false "
                        "to quantize without it")
    model = copy.deepcopy(original)
    record = quantize(model, cfg, tokenizer)
    save_compressed(cfg.out, model, tokenizer, {**before, "quantization": {**record, "source": str(cfg.model)}})
    print(f"quantized {cfg.model} with {cfg.method} ({len(record['layers']) or 'all'} layers) -> {cfg.out}")
    if not cfg.report:
        return {"quantization": record}
    quantized, _ = load(cfg.out, pick_device(cfg.device))  # measure what a user will load, not the in-memory copy
    report = compression_report(original, quantized, tokenizer, cfg.data, original_folder=cfg.model,
                                compressed_folder=cfg.out, extra={"method": cfg.method, **format_options(cfg)})
    finish_report(report, cfg.out)
    return report
