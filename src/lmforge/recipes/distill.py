"""`lmforge distill`: train a small student on a trained teacher's softened distribution (Hinton et al. 2015).

teacher (lmforge checkpoint or HF folder, with its tokenizer) → pretrain's data pipeline on the teacher's
tokenizer (token shard, the family's batch maker: next-token windows, BERT's MLM or T5's span corruption) →
the one training loop with `DistillationLoss` and the teacher's logits on each batch (or its top-k, optionally
cached on disk) → out_dir/model (a checkpoint with compression.json) → the report against the teacher.

The student is a preset (its vocabulary, context length and special-token ids taken from the teacher unless
overridden with --student_model.*), `teacher` (the teacher's own architecture with --student_model.* overrides,
e.g. half its n_layers; --init_from_teacher then starts it from every other teacher block, as DistilBERT), or a
checkpoint folder with the teacher's vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.compress.distill import (
    DistillationLoss,
    TeacherBatches,
    TeacherCache,
    check_distill_options,
    check_distillable,
    init_from_teacher,
    weights_digest,
)
from lmforge.compress.storage import save_compressed
from lmforge.config import ModelConfig
from lmforge.data import TokenShard, build_shard, load_shard, read_documents, resolve_files
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.estimate import flops_per_token
from lmforge.files import check_can_create
from lmforge.interop import load
from lmforge.models import Model, build_model
from lmforge.recipes.compress_common import CompressData, compression_report, finish_report, previous_compression
from lmforge.recipes.pretrain import DATA_DIR, DataConfig, PretrainConfig, batch_makers
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, TrainResult, save_checkpoint, train
from lmforge.train.loop import CHECKPOINT_DIR

TEACHER_SHAPE = "teacher"  # --student teacher: the teacher's own architecture, shaped by --student_model.*
MODEL_DIR = "model"  # the distilled student, as a compressed checkpoint folder
CONFIG_FILE = "distill_config.json"
# What the student takes from the teacher unless --student_model.* says otherwise: logits must line up token
# for token, inputs must fit both, and a T5 student starts decoding where its teacher does.
INHERITED = ("vocab_size", "context_length", "decoder_start_id", "bos_id", "eos_id", "pad_id")


@dataclass
class DistillConfig:
    teacher: str = field(default="", metadata={"help": "the trained model: lmforge checkpoint or Hugging Face folder "
                                                        "with its tokenizer (required)"})
    student: str = field(default="", metadata={
        "help": "a model preset (e.g. tiny, small; shaped further by --student_model.*), 'teacher' (the teacher's "
                "architecture, e.g. with fewer --student_model.n_layers) or a checkpoint folder with the teacher's "
                "vocabulary (required)"})
    student_model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "ModelConfig fields overriding the student preset", "options": ModelConfig})
    init_from_teacher: bool = field(default=False, metadata={
        "help": "start the student from the teacher's embeddings, head and evenly spread blocks (DistilBERT: every "
                "other one); needs the teacher's widths, e.g. --student teacher --student_model.n_layers N"})
    out_dir: str = field(default="runs/distill", metadata={"help": "run folder (checkpoint, metrics, model, report)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the teacher's soft targets; 1 - alpha weights "
                                                        "the labels' cross-entropy"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of both distributions"})
    top_k: int = field(default=0, metadata={"help": "keep only the teacher's top-k logits per position (see --tail); "
                                                    "0 = full logits"})
    tail: bool = field(default=True, metadata={
        "help": "with --top_k: keep the teacher's mass outside its top-k as one more outcome (an exact KL over K+1 "
                "outcomes); false = renormalise over the top-k (the student learns the tail is empty)"})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "folder caching the teacher's top-k per batch (needs --top_k); a later run with the same teacher, "
                "data, seed and batch shape reads it instead of running the teacher"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if out_dir holds a checkpoint"})
    mask_rate: float = field(default=0.15, metadata={"help": "masked: share of tokens chosen for the MLM loss"})
    noise_density: float = field(default=0.15, metadata={"help": "seq2seq: share of tokens in corrupted spans"})
    mean_span_length: float = field(default=3.0, metadata={"help": "seq2seq: mean corrupted span length"})
    report: bool = field(default=True, metadata={"help": "measure the student against the teacher (perplexity, "
                                                         "bytes, decode speed) into out_dir/compression_report.json"})

    def __post_init__(self) -> None:
        if not self.student and self.student_model.get("preset"):  # --student_model.preset names it too
            self.student = str(self.student_model["preset"])
        check_distill_options(self.alpha, self.temperature)
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = the teacher's full logits)")
        if self.teacher_cache and not self.top_k:
            raise UserError("--teacher_cache stores the teacher's top-k logits; pass --top_k K (e.g. 32) with it")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one")


@dataclass
class DistillResult:
    student: Model
    teacher: Model
    tokenizer: Tokenizer
    result: TrainResult
    out_dir: Path
    model_dir: Path
    teacher_calls: int
    report: dict[str, Any] | None


def load_teacher(path: str, device: torch.device) -> tuple[Model, Tokenizer]:
    """The frozen teacher and its tokenizer (the student reads the same tokens)."""
    teacher, tokenizer = load(path, device)
    if tokenizer is None:
        raise UserError(f"teacher '{path}' has no tokenizer.json; distillation reads text with the teacher's tokenizer")
    check_distillable(teacher, "teacher")
    return teacher.eval().requires_grad_(False), tokenizer


def student_config(cfg: DistillConfig, teacher: ModelConfig) -> ModelConfig:
    """A preset student's config: the preset, the teacher's INHERITED fields, then --student_model.* overrides."""
    overrides = dict(cfg.student_model)
    preset = overrides.pop("preset", cfg.student)
    if preset != cfg.student:
        raise UserError(f"--student {cfg.student} and --student_model.preset {preset} disagree; pass one of them")
    if overrides.get("vocab_size", teacher.vocab_size) != teacher.vocab_size:
        raise UserError(f"student_model.vocab_size={overrides['vocab_size']} differs from the teacher's "
                        f"{teacher.vocab_size}; the logits must line up token for token, so leave it unset")
    if preset == TEACHER_SHAPE:
        student = ModelConfig.from_dict({**dataclasses.asdict(teacher), **overrides})
    else:
        inherited = {name: getattr(teacher, name) for name in INHERITED}
        student = ModelConfig.from_preset(preset, **{**inherited, **overrides})
    _check_pair(student, teacher, f"preset '{preset}'")
    return student


def _check_pair(student: ModelConfig, teacher: ModelConfig, what: str) -> None:
    if student.family != teacher.family:
        raise UserError(f"the student ({what}) is a {student.family} model but the teacher a {teacher.family} one; "
                        f"pick a {teacher.family} student")
    if student.vocab_size != teacher.vocab_size:
        raise UserError(f"the student ({what}) has a vocabulary of {student.vocab_size} tokens, the teacher "
                        f"{teacher.vocab_size}; distillation needs the same vocabulary")
    if student.context_length > teacher.context_length:
        raise UserError(f"the student ({what}) has context_length={student.context_length}, longer than the "
                        f"teacher's {teacher.context_length}; set --student_model.context_length "
                        f"{teacher.context_length} or less")


def build_student(cfg: DistillConfig, teacher: Model, out: Path) -> Model:
    """The model to train: from out_dir's checkpoint config on --resume (the loop restores its weights), a
    checkpoint folder's weights, or a preset (or the teacher's shape) initialised at random or, with
    --init_from_teacher, from the teacher's blocks."""
    if cfg.resume:
        student_cfg = ModelConfig.load(out / CHECKPOINT_DIR / "config.json")
        _check_pair(student_cfg, teacher.cfg, f"the checkpoint in '{out}'")
        return build_model(student_cfg)
    if cfg.student != TEACHER_SHAPE and Path(cfg.student).is_dir():
        if cfg.init_from_teacher:
            raise UserError(f"--init_from_teacher starts a new student from the teacher's blocks, but --student "
                            f"'{cfg.student}' is a checkpoint with weights of its own; drop one of them")
        if cfg.student_model:
            raise UserError(f"--student_model.* shapes a preset student, but --student '{cfg.student}' is a "
                            "checkpoint folder; drop them or pass a preset")
        if "quantization" in previous_compression(cfg.student):
            raise UserError(f"student '{cfg.student}' is quantized and cannot be trained; distil into its "
                            "full-precision original, then quantize the result")
        student, _ = load(cfg.student)
        _check_pair(student.cfg, teacher.cfg, f"'{cfg.student}'")
        check_distillable(student, "student")
        return student.train().requires_grad_(True)
    student_cfg = student_config(cfg, teacher.cfg)
    torch.manual_seed(cfg.train.seed)  # the same config gives the same initial student
    student = build_model(student_cfg)
    if cfg.init_from_teacher:
        layers = init_from_teacher(student, teacher)
        print("student blocks start from the teacher's: " + "; ".join(f"{stack} {picked}"
                                                                        for stack, picked in layers.items()))
    return student


def _check_out_dir(cfg: DistillConfig, out: Path) -> None:
    """--resume needs a checkpoint in out_dir; a fresh run must not silently replace one."""
    check_can_create(out, "--out_dir")
    checkpoint = out / CHECKPOINT_DIR
    if cfg.resume and not (checkpoint / "config.json").is_file():
        raise UserError(f"nothing to resume in '{out}' (no {CHECKPOINT_DIR}/config.json); drop --resume")
    if not cfg.resume and checkpoint.exists() and not cfg.overwrite:
        raise UserError(f"'{out}' already holds a checkpoint; pass --resume to continue it, --overwrite to start "
                        "afresh, or choose another --out_dir")


def _prepare_data(cfg: DistillConfig, tokenizer: Tokenizer, out: Path) -> TokenShard:
    """pretrain's token shard of the corpus, made with the teacher's tokenizer (reused on --resume)."""
    if cfg.resume:
        return load_shard(out / DATA_DIR)
    files = resolve_files(cfg.data.sources, cfg.data.shuffle_seed)
    shard = build_shard(read_documents(files, cfg.data.jsonl_field, cfg.data.max_bytes), tokenizer,
                        out / DATA_DIR, cfg.data.val_fraction)
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return shard


def _pipeline_config(cfg: DistillConfig) -> PretrainConfig:
    """pretrain's batch makers read their options from a PretrainConfig."""
    return PretrainConfig(family="causal", data=cfg.data, train=cfg.train, mask_rate=cfg.mask_rate,
                          noise_density=cfg.noise_density, mean_span_length=cfg.mean_span_length)


def cache_record(cfg: DistillConfig, teacher: Model, student: Model, shard: TokenShard) -> dict[str, Any]:
    """Everything the teacher's answer on micro-batch i depends on: the teacher, the tokens, and how batches
    are cut from them (seed, shape, objective)."""
    objective = {"causal": {}, "masked": {"mask_rate": cfg.mask_rate},
                 "seq2seq": {"noise_density": cfg.noise_density, "mean_span_length": cfg.mean_span_length}}
    return {
        "teacher": str(Path(cfg.teacher).resolve()),
        "teacher_weights": weights_digest(teacher),
        "data": hashlib.sha256(shard.train.tobytes()).hexdigest(),
        "seed": cfg.train.seed,
        "batch_size": cfg.train.batch_size,
        "context_length": student.cfg.context_length,
        "family": student.cfg.family,
        "objective": objective[student.cfg.family],
        "top_k": cfg.top_k,
        "tail_temperature": cfg.temperature if cfg.tail else None,
    }


def run_distill(cfg: DistillConfig) -> DistillResult:
    """Distil the teacher into the student with the one training loop; save out_dir/model and the report."""
    if not cfg.teacher or not cfg.student:
        raise UserError("distill needs --teacher CHECKPOINT and --student PRESET_OR_CHECKPOINT")
    out = Path(cfg.out_dir)
    _check_out_dir(cfg, out)
    report_data = _report_data(cfg) if cfg.report else None  # its options are checked before any training
    device = pick_device(cfg.train.device)
    teacher, tokenizer = load_teacher(cfg.teacher, device)
    if cfg.top_k > teacher.cfg.vocab_size:
        raise UserError(f"top_k={cfg.top_k} is more than the teacher's vocabulary of {teacher.cfg.vocab_size}")
    fresh = not out.exists()
    try:
        student = build_student(cfg, teacher, out)
        out.mkdir(parents=True, exist_ok=True)
        shard = _prepare_data(cfg, tokenizer, out)
        train_batches, val_batches = batch_makers(_pipeline_config(cfg), student.cfg, shard, tokenizer)
        cache = TeacherCache(cfg.teacher_cache, cache_record(cfg, teacher, student, shard)) if cfg.teacher_cache \
            else None
        teacher_batches = TeacherBatches(train_batches, teacher, top_k=cfg.top_k, cache=cache,
                                         temperature=cfg.temperature if cfg.tail else None,
                                         precision=cfg.train.precision)
    except BaseException:
        if fresh:  # a run that fails before training leaves no half-built folder (an existing one is kept)
            shutil.rmtree(out, ignore_errors=True)
        raise
    context = student.cfg.context_length
    _describe(teacher, student, shard)
    result = train(
        # alpha = 0 weighs the teacher by nothing: the same student on the same batches, trained on the labels
        # alone (the baseline a distilled student is compared with), without paying for the teacher's forward.
        student, teacher_batches if cfg.alpha > 0 else train_batches, cfg.train,
        loss_fn=DistillationLoss(cfg.alpha, cfg.temperature),
        val_batches=val_batches, out_dir=out, tokens_per_step=cfg.train.batch_size * context * cfg.train.grad_accum,
        flops_per_token=flops_per_token(student.cfg, context),
        save=lambda folder, state, tensors: save_checkpoint(folder, student, tokenizer, state, tensors),
        resume=cfg.resume,
    )
    from lmforge.plots import plot_loss_curve  # matplotlib only where a picture is drawn

    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    student.eval()
    model_dir = out / MODEL_DIR
    save_compressed(model_dir, student, tokenizer,
                    {**_student_compression(cfg), "distillation": _record(cfg, teacher, student, result)})
    print(f"distilled {cfg.teacher} ({teacher.num_parameters():,} parameters) into {student.num_parameters():,} "
          f"-> {model_dir}")
    report = _report(cfg, teacher, tokenizer, model_dir, device, report_data) if report_data else None
    return DistillResult(student=student, teacher=teacher, tokenizer=tokenizer, result=result, out_dir=out,
                         model_dir=model_dir, teacher_calls=teacher_batches.teacher_calls, report=report)


def _student_compression(cfg: DistillConfig) -> dict[str, Any]:
    """A checkpoint student's own compression record (e.g. it was pruned), kept beside the distillation's."""
    return previous_compression(cfg.student)


def _describe(teacher: Model, student: Model, shard: TokenShard) -> None:
    t, s = teacher.num_parameters(), student.num_parameters()
    print(f"teacher: {t / 1e6:.2f}M parameters; student: {s / 1e6:.2f}M ({s / t:.1%} of the teacher), "
          f"{student.cfg.n_layers} layers, d={student.cfg.d_model}; data: {len(shard.train):,} train / "
          f"{len(shard.val):,} val tokens")


def _record(cfg: DistillConfig, teacher: Model, student: Model, result: TrainResult) -> dict[str, Any]:
    """compression.json's "distillation" entry: what the student was distilled from and how."""
    micro_batches = result.step * cfg.train.grad_accum
    return {"teacher": str(cfg.teacher), "teacher_parameters": teacher.num_parameters(), "alpha": cfg.alpha,
            "temperature": cfg.temperature, "top_k": cfg.top_k, "tail": bool(cfg.top_k and cfg.tail),
            "steps": result.step, "tokens": micro_batches * cfg.train.batch_size * student.cfg.context_length,
            "student": cfg.student, "student_parameters": student.num_parameters(),
            "init_from_teacher": cfg.init_from_teacher}


def _report_data(cfg: DistillConfig) -> CompressData:
    """The report reads the training corpus and scores the tail it held out for validation."""
    return CompressData(sources=cfg.data.sources, jsonl_field=cfg.data.jsonl_field, max_bytes=cfg.data.max_bytes,
                        shuffle_seed=cfg.data.shuffle_seed, val_fraction=cfg.data.val_fraction)


def _report(cfg: DistillConfig, teacher: Model, tokenizer: Tokenizer, model_dir: Path, device: torch.device,
            data: CompressData) -> dict[str, Any]:
    """The saved student, as a user loads it, measured against the teacher on the held-out tail of the corpus."""
    student, _ = load(model_dir, device)
    teacher_folder = cfg.teacher if Path(cfg.teacher).is_dir() else None
    report = compression_report(teacher, student, tokenizer, data, original_folder=teacher_folder,
                                compressed_folder=model_dir,
                                extra={"method": "distillation", "alpha": cfg.alpha, "temperature": cfg.temperature,
                                       "top_k": cfg.top_k})
    finish_report(report, cfg.out_dir)
    return report
