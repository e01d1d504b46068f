"""`lmforge estimate`: what a model costs before it is built: parameters, memory for inference and for training
(by precision, method and sharding), KV cache, training compute, and the compute-optimal size for a budget.

`--check-seeds` checks every numeric claim in the study notes (../shared/seeds) against the same arithmetic:
the quote (verbatim, with its file), the computation and a verdict. The arithmetic lives in `lmforge.estimate`;
this module picks the model, lays the numbers out (text, Markdown or JSON) and draws the scaling plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import estimate as est
from lmforge.checkpoint import CONFIG_FILE
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.interop.folders import is_hf_folder
from lmforge.interop.hf import config_from_hf
from lmforge.recipes.estimate_seeds import SEEDS_DIR, check_seeds, render_claims, seed_claims

FORMATS = ("text", "markdown", "json")
GiB = 2**30


@dataclass
class EstimateConfig:
    checkpoint: str = field(default="", metadata={
        "flag": "model", "help": "lmforge checkpoint or Hugging Face folder whose config.json to read (or use "
                                 "--model.preset)"})
    model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "a model preset and ModelConfig overrides", "options": ModelConfig})
    method: str = field(default="full", metadata={"help": "full | lora | qlora: what trains"})
    precision: str = field(default="bf16", metadata={
        "help": "fp32 | bf16 | fp16 | int8 | int4: weights (bf16/fp16 train with an fp32 master copy; int8/int4 "
                "quantize the block linears of an inference model or a LoRA base)"})
    lora_r: int = field(default=8, metadata={"help": "lora/qlora rank"})
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={
        "help": "lora/qlora projections: q k v o gate up down (cross_q ... for seq2seq) | all"})
    world_size: int = field(default=1, metadata={"help": "devices training together"})
    distributed: str = field(default="none", metadata={"help": "none | ddp | zero1 | zero2 | zero3"})
    batch_size: int = field(default=1, metadata={"help": "sequences per device per micro-batch (activations, KV)"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence; unset = context_length"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})
    tokens: float | None = field(default=None, metadata={"help": "training tokens D; unset = 20 per parameter"})
    compute: float | None = field(default=None, metadata={
        "help": "a compute budget C in FLOPs for the compute-optimal N and D; unset = the model's own 6ND"})
    mfu: float = field(default=0.4, metadata={"help": "model-FLOPs utilisation for GPU-days"})
    gpu: str = field(default="a100", metadata={"help": "v100 | a100 | h100 (dense 16-bit peaks 125, 312, 989 "
                                                       "TFLOP/s)"})
    json: str | None = field(default=None, metadata={"help": "also write the numbers to this JSON file"})
    plot: str | None = field(default=None, metadata={"help": "PNG of loss against compute (Chinchilla's law)"})
    check_seeds: bool = field(default=False, metadata={
        "flag": "check-seeds", "help": "check the seeds' numeric claims (quote, computation, verdict)"})
    seeds_dir: str = field(default=str(SEEDS_DIR), metadata={
        "help": "the seeds folder whose quotes are verified verbatim (skipped when absent)"})
    format: str = field(default="text", metadata={"help": "text | markdown | json (what is printed)"})

    def __post_init__(self) -> None:
        est.check_choice("method", self.method, est.METHODS)
        est.check_choice("precision", self.precision, tuple(est.PRECISIONS))
        est.check_choice("distributed", self.distributed, est.DISTRIBUTED)
        est.check_choice("gpu", self.gpu, tuple(est.GPUS))
        est.check_choice("format", self.format, FORMATS)
        for name in ("world_size", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise UserError(f"seq_len={self.seq_len} must be >= 1 (or unset for the context length)")
        for name in ("tokens", "compute"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name}={value} must be a positive number")
        if not 0 < self.mfu <= 1:
            raise UserError(f"mfu={self.mfu} must be in (0, 1], e.g. 0.4")
        if self.distributed == "none" and self.world_size > 1:
            raise UserError(f"world_size={self.world_size} needs --distributed ddp|zero1|zero2|zero3")
        if self.checkpoint and self.model.get("preset"):
            raise UserError("pass --model CKPT or --model.preset P, not both")


def model_config(cfg: EstimateConfig) -> tuple[str, ModelConfig] | None:
    """The model to estimate: a folder's config.json or a preset, with --model.* overrides; None without one."""
    overrides = {k: v for k, v in cfg.model.items() if k != "preset"}
    if cfg.checkpoint:
        return cfg.checkpoint, ModelConfig.from_dict({**folder_config(cfg.checkpoint).to_dict(), **overrides})
    if "preset" in cfg.model:
        return cfg.model["preset"], ModelConfig.from_preset(cfg.model["preset"], **overrides)
    if overrides:
        raise UserError("--model.* overrides need a model: add --model.preset P or --model CKPT")
    return None


def folder_config(folder: str) -> ModelConfig:
    """The ModelConfig of an lmforge checkpoint or Hugging Face folder, read from its config.json alone."""
    path = Path(folder)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"'{folder}' has no {CONFIG_FILE}; pass a checkpoint or Hugging Face model folder")
    if is_hf_folder(path):
        try:
            return config_from_hf(read_json_object(path / CONFIG_FILE, "model config", "fix or re-download it"))
        except UserError as exc:
            raise UserError(f"model config '{path / CONFIG_FILE}': {exc}") from None
    return ModelConfig.load(path / CONFIG_FILE)


# -- the numbers --------------------------------------------------------------------------------------------


def memory_report(cfg: EstimateConfig, model: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Inference and training bytes, and per-device training bytes under every sharding strategy."""
    memory = est.model_memory(model, cfg.method, cfg.precision, cfg.lora_r, cfg.lora_targets)
    acts = {ckpt: est.activation_bytes(model, cfg.batch_size, seq_len, cfg.precision, ckpt) for ckpt in (False, True)}
    strategies = ["none"] if cfg.world_size == 1 else ["ddp", "zero1", "zero2", "zero3"]
    dlogits = est.logits_gradient_bytes(model, cfg.batch_size, seq_len)  # beside the activations as backward starts
    per_device = {}
    for strategy in strategies:
        gathered, buffers = est.lmforge_sharding(model, memory, strategy, cfg.world_size)
        for ckpt in (False, True):
            per_device[f"{strategy}{'+ckpt' if ckpt else ''}"] = est.per_device_memory(
                memory, acts[ckpt]["total"] + dlogits, cfg.world_size, strategy, gathered, buffers)
    chosen = f"{cfg.distributed}{'+ckpt' if cfg.activation_checkpointing else ''}"
    return {
        "inference": {"weights": est.inference_weight_bytes(model, cfg.precision),
                      "kv_cache": est.kv_cache_bytes(model, cfg.batch_size, seq_len, cfg.precision)},
        "training": {"parameters": memory.parameters, "trainable": memory.trainable, "weights": memory.weights,
                     "gradients": memory.gradients, "optimizer": memory.optimizer, "master": memory.master,
                     "states": memory.training},
        "activations": {"per_token_per_layer": est.activation_bytes_per_token_per_layer(model, seq_len,
                                                                                        cfg.precision),
                        "per_token_per_layer_checkpointed": est.activation_bytes_per_token_per_layer(
                            model, seq_len, cfg.precision, True),
                        "micro_batch": acts[False]["total"], "micro_batch_checkpointed": acts[True]["total"]},
        "per_device": per_device,
        "chosen": per_device.get(chosen, per_device[next(iter(per_device))]),
        "seeds_24_bytes_rule": est.training_memory_bytes(est.count_parameters(model)),
    }


def compute_report(cfg: EstimateConfig, model: ModelConfig, seq_len: int) -> dict[str, Any]:
    n = est.count_parameters(model)
    tokens = cfg.tokens or est.compute_optimal_tokens(n)
    flops = est.flops_per_token(model, seq_len) * tokens
    return {"tokens": tokens, "flops_per_token": est.flops_per_token(model, seq_len), "flops": flops,
            "flops_6nd": est.training_flops(n, tokens), "petaflop_s_days": est.petaflop_s_days(flops),
            "gpu_days": {gpu: est.gpu_days(flops, gpu, cfg.mfu) for gpu in est.GPUS}, "mfu": cfg.mfu,
            "loss_law": est.chinchilla_loss(n, tokens)}


def chinchilla_report(compute: float) -> dict[str, Any]:
    rule_n, rule_d = est.chinchilla_rule(compute)
    law_n, law_d = est.chinchilla_optimum(compute)
    return {"compute": compute, "petaflop_s_days": est.petaflop_s_days(compute),
            "rule": {"parameters": rule_n, "tokens": rule_d, "loss": est.chinchilla_loss(rule_n, rule_d)},
            "law": {"parameters": law_n, "tokens": law_d, "loss": est.chinchilla_loss(law_n, law_d),
                    "tokens_per_parameter": law_d / law_n},
            "constants": est.CHINCHILLA_LAW}


def estimate_report(cfg: EstimateConfig) -> dict[str, Any]:
    """Everything `lmforge estimate` prints, as one JSON-able dict."""
    report: dict[str, Any] = {}
    picked = model_config(cfg)
    compute = cfg.compute
    if picked is not None:
        name, model = picked
        est.check_transformer(model)
        seq_len = cfg.seq_len or model.context_length
        report["model"] = {"name": name, "family": model.family, "parameters": est.count_parameters(model),
                           "breakdown": est.parameter_breakdown(model), "matmul": est.matmul_parameters(model),
                           "lora": est.lora_parameters(model, cfg.lora_r, cfg.lora_targets),
                           "seq_len": seq_len, "batch_size": cfg.batch_size}
        report["settings"] = {k: getattr(cfg, k) for k in ("method", "precision", "world_size", "distributed",
                                                           "activation_checkpointing", "gpu", "mfu")}
        report["memory"] = memory_report(cfg, model, seq_len)
        report["compute"] = compute_report(cfg, model, seq_len)
        compute = compute or report["compute"]["flops_6nd"]
    if compute is not None:
        report["chinchilla"] = chinchilla_report(compute)
    if cfg.check_seeds:
        report["seeds"] = {"verified_in": check_seeds(cfg.seeds_dir), "claims": [c.as_dict() for c in seed_claims()]}
    if not report:
        raise UserError("nothing to estimate: pass --model.preset P or --model CKPT, --compute FLOPS, or --check-seeds")
    return report


# -- rendering ------------------------------------------------------------------------------------------------


def gb(value: float) -> str:
    return f"{value / 1e9:,.2f} GB"


def count(value: float) -> str:
    return f"{value / 1e9:,.3f}B" if value >= 1e9 else f"{value / 1e6:,.2f}M" if value >= 1e6 else f"{value:,.0f}"


def table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


def render_model(report: dict[str, Any]) -> list[str]:
    m, mem, comp, settings = report["model"], report["memory"], report["compute"], report["settings"]
    train, acts = mem["training"], mem["activations"]
    parts = [(f"  {k}", f"{v:,}") for k, v in m["breakdown"].items()]
    out = [table(f"{m['name']} ({m['family']})", [("parameters", f"{m['parameters']:,} ({count(m['parameters'])})"),
                                                  *parts, ("matmul weights", f"{m['matmul']:,}")])]
    out.append(table(f"inference at {settings['precision']}, batch {m['batch_size']} x {m['seq_len']} tokens", [
        ("weights", gb(mem["inference"]["weights"])), ("KV cache", gb(mem["inference"]["kv_cache"]))]))
    out.append(table(f"training: --method {settings['method']} at {settings['precision']}", [
        ("trainable parameters", f"{train['trainable']:,}"), ("weights", gb(train["weights"])),
        ("gradients", gb(train["gradients"])), ("AdamW moments", gb(train["optimizer"])),
        ("fp32 master weights", gb(train["master"])), ("states in all", gb(train["states"])),
        ("activations / token / layer", f"{acts['per_token_per_layer']:,.0f} B "
                                        f"({acts['per_token_per_layer_checkpointed']:,.0f} B checkpointed)"),
        ("activations / micro-batch", f"{gb(acts['micro_batch'])} ({gb(acts['micro_batch_checkpointed'])} "
                                      "checkpointed)"),
        ("the seeds' 24 B/param rule", gb(mem["seeds_24_bytes_rule"]))]))
    rows = [(name, f"{gb(d['total'])}, peak {gb(d['peak'])}  (weights {gb(d['weights'])}, grads "
                   f"{gb(d['gradients'])}, optimizer {gb(d['optimizer'])}, buffers {gb(d['buffers'])}, activations "
                   f"{gb(d['activations'])})")
            for name, d in mem["per_device"].items()]
    out.append(table(f"per device at world size {settings['world_size']}", rows))
    out.append(table(f"training compute for {count(comp['tokens'])} tokens", [
        ("FLOPs / token", f"{comp['flops_per_token']:.4g}"), ("FLOPs", f"{comp['flops']:.4g} (6ND: "
                                                                       f"{comp['flops_6nd']:.4g})"),
        ("petaflop/s-days", f"{comp['petaflop_s_days']:,.2f}"),
        *((f"{gpu} GPU-days at MFU {comp['mfu']}", f"{days:,.1f}") for gpu, days in comp["gpu_days"].items()),
        ("Chinchilla-law loss", f"{comp['loss_law']:.3f} nats/token")]))
    return out


def render_chinchilla(c: dict[str, Any]) -> str:
    rule, law = c["rule"], c["law"]
    return table(f"compute-optimal for C = {c['compute']:.3g} FLOPs ({c['petaflop_s_days']:,.1f} PF-days)", [
        ("20 tokens/parameter rule", f"N = {count(rule['parameters'])}, D = {count(rule['tokens'])} "
                                     f"(loss {rule['loss']:.3f})"),
        ("fitted law (Hoffmann et al.)", f"N = {count(law['parameters'])}, D = {count(law['tokens'])}, "
                                         f"{law['tokens_per_parameter']:.0f} tokens/parameter "
                                         f"(loss {law['loss']:.3f})")])


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    blocks = render_model(report) if "model" in report else []
    if "chinchilla" in report:
        blocks.append(render_chinchilla(report["chinchilla"]))
    if "seeds" in report:
        blocks.append(render_claims(seed_claims(), fmt, report["seeds"]["verified_in"]))
    return "\n\n".join(blocks)


def plot_scaling(png: str | Path, sizes: tuple[float, ...] = (1e8, 1e9, 1e10, 7e10, 1e11)) -> Path:
    """Loss against training compute from Chinchilla's fitted law for a few model sizes, with the frontier."""
    from lmforge.plots import plt  # matplotlib only where a picture is drawn

    budgets = [10 ** (17 + i / 10) for i in range(81)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for n in sizes:
        ax.plot(budgets, [est.chinchilla_loss(n, c / (6 * n)) for c in budgets], label=f"N = {count(n)}", lw=1.2)
    frontier = [est.chinchilla_loss(*est.chinchilla_optimum(c)) for c in budgets]
    ax.plot(budgets, frontier, "k--", lw=1.8, label="compute-optimal frontier")
    ax.set_xscale("log")
    ax.set_ylim(1.8, 4.0)
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def run_estimate(cfg: EstimateConfig) -> dict[str, Any]:
    """Print the estimate (and the seeds' claims with --check-seeds); write --json and --plot if asked."""
    report = estimate_report(cfg)
    print(render(report, cfg.format))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    if cfg.plot:
        plot_scaling(cfg.plot)
    return report
