"""Knowledge distillation (Hinton et al. 2015): a small student learns the teacher's softened distribution.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The T^2 keeps the soft term's gradients on the scale of the hard one as T grows. Both terms are averaged over
the labelled positions (labels == -100 are ignored by both), in fp32.

Everything runs in the one training loop: `TeacherBatches` wraps a batch function and adds the frozen teacher's
logits to each batch (the loop calls `batches(i)` outside autocast, and it may run a model), and
`DistillationLoss` is the loop's `loss_fn`. Causal, seq2seq (same encoder input and decoder labels for both) and
masked-LM batches work alike, since each family's forward already takes the batch as it comes.

With `top_k` > 0 only the teacher's K largest logits are kept (fp16 values, int32 indices) and, optionally, the
log of its probability mass on all other tokens (one fp32 per position), which `sparse_distillation_loss` keeps as
one more outcome. A `TeacherCache` can store them on disk per micro-batch index: batches are a pure function of
that index, so a later run (another student, a resume) reads the teacher's answer instead of running the teacher.

Measured (tinyshakespeare, char-level, 0.81M-parameter teacher at held-out perplexity 6.46, 0.11M student, 500
steps of 16x64 tokens, T = 2, alpha = 0.8): trained from scratch 10.17; distilled on full logits 8.42; on the top-8
with the tail 9.47; on the top-8 renormalised 13.80, worse than no teacher: the student learns that the tail is
empty. Hence the tail by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoint import load_model_tensors, model_tensors, read_safetensors
from lmforge.device import autocast_for
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models import IGNORE_INDEX, MaskedLM, Model
from lmforge.train import FAMILY_LOSSES

# Keys TeacherBatches adds to a batch; the student never sees them.
TEACHER_LOGITS = "teacher_logits"
TEACHER_VALUES = "teacher_topk_values"
TEACHER_INDICES = "teacher_topk_indices"
TEACHER_TAIL = "teacher_tail_logprob"
TEACHER_KEYS = (TEACHER_LOGITS, TEACHER_VALUES, TEACHER_INDICES, TEACHER_TAIL)
_MASKED = -1e4  # a finite "minus infinity" for the student's top-k when summing its tail (keeps gradients finite)
CACHE_MANIFEST = "teacher_cache.json"
CACHE_FORMAT = 1
Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def check_distill_options(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha={alpha} must be in [0, 1] (the weight of the teacher's soft targets; 0.5 is usual)")
    if not temperature > 0:
        raise UserError(f"temperature={temperature} must be > 0 (1 = the teacher's own distribution; 2 is usual)")


def _labelled(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat 0/1 weights of the labelled positions, their count clamped to >= 1): a weighted mean instead of
    boolean indexing keeps shapes static and needs no host sync."""
    weights = (labels.reshape(-1) != IGNORE_INDEX).float()
    return weights, weights.sum().clamp(min=1.0)


def _combine(kl_per_position: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, alpha: float,
             temperature: float) -> Losses:
    weights, count = _labelled(labels)
    kl = (kl_per_position * weights).sum() / count
    ce = F.cross_entropy(student, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / count
    loss = alpha * temperature ** 2 * kl + (1.0 - alpha) * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> Losses:
    """(loss, {"kl", "ce"}) for logits (..., vocab) and labels (...) with -100 = no label; see the module doc."""
    check_distill_options(alpha, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise UserError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                        f"{tuple(student_logits.shape)} differ; both models need the same vocabulary and inputs")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _combine(kl, student, labels, alpha, temperature)


def sparse_distillation_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                             teacher_indices: torch.Tensor, labels: torch.Tensor, alpha: float,
                             temperature: float, teacher_tail: torch.Tensor | None = None) -> Losses:
    """`distillation_loss` against a teacher known only by its top-k logits (values, indices: (..., K)).

    Without `teacher_tail` (the approximation of the plain top-k recipe): the teacher's distribution is
    softmax(values / T) renormalised over its K tokens, its tail mass dropped, and the KL compares it with the
    student's full-vocabulary log-probs gathered at those K indices. The student is then taught that the tail
    has no mass at all, which hurts when the tail is heavy (a small K, a high T, a small vocabulary).

    With `teacher_tail` (..., the log of the teacher's probability mass outside its top-k at temperature T, as
    `TeacherBatches` records it): the rest of the vocabulary is one more outcome, and the loss is the exact KL
    between both distributions coarsened to K tokens + "any other token". That is a lower bound of the full KL,
    and it keeps the student's total tail mass at the teacher's.

    Either way, with K = vocab it is exactly the full loss.
    """
    check_distill_options(alpha, temperature)
    if teacher_values.shape[:-1] != student_logits.shape[:-1] or teacher_indices.shape != teacher_values.shape:
        raise UserError(f"cached teacher top-k {tuple(teacher_values.shape)} does not fit the student logits "
                        f"{tuple(student_logits.shape)}; the cache was made for other batches")
    vocab, k = student_logits.shape[-1], teacher_values.shape[-1]
    student = student_logits.reshape(-1, vocab).float()
    indices = teacher_indices.reshape(-1, k).long()
    scaled = student / temperature
    log_p_student = F.log_softmax(scaled, dim=-1).gather(-1, indices)
    log_q_teacher = F.log_softmax(teacher_values.reshape(-1, k).float() / temperature, dim=-1)
    if teacher_tail is None:
        kl = (log_q_teacher.exp() * (log_q_teacher - log_p_student)).sum(-1)
        return _combine(kl, student, labels, alpha, temperature)
    log_q_tail = teacher_tail.reshape(-1).float().clamp(max=0.0)
    q_tail = log_q_tail.exp()
    log_q_teacher = log_q_teacher + torch.log1p(-q_tail.clamp(max=1 - 1e-7))[:, None]  # the top-k share 1 - tail
    log_p_tail = torch.logsumexp(scaled.scatter(-1, indices, _MASKED), -1) - torch.logsumexp(scaled, -1)
    tail_term = torch.where(q_tail > 0, q_tail * (log_q_tail - log_p_tail), torch.zeros_like(q_tail))
    kl = (log_q_teacher.exp() * (log_q_teacher - log_p_student)).sum(-1) + tail_term
    return _combine(kl, student, labels, alpha, temperature)


def teacher_tail(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the teacher's probability mass outside its top-k `indices` at temperature T (-inf when K = vocab)."""
    scaled = logits.float() / temperature
    return torch.logsumexp(scaled.scatter(-1, indices, float("-inf")), -1) - torch.logsumexp(scaled, -1)


def check_distillable(model: nn.Module, role: str) -> None:
    """Distillation compares next-token (or masked-token) distributions: the model needs a language-model head."""
    family = model.cfg.family
    if family == "masked" and not isinstance(model, MaskedLM):
        raise UserError(f"the {role} is a masked model with a '{model.cfg.head}' head; distillation needs a "
                        "masked-LM head (head=lm)")
    if family not in FAMILY_LOSSES:
        raise UserError(f"the {role} is a {family} model; distillation supports: {', '.join(FAMILY_LOSSES)}")


def model_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The logits the loss compares, from a batch as the family's batch maker makes it: causal (B, T, V),
    seq2seq (B, T_target, V) under teacher forcing, masked (N, V) at the N masked positions only."""
    family = model.cfg.family
    if family == "causal":
        return model(batch["input_ids"]).logits
    if family == "masked":
        return model(**batch, labelled_only=True).logits
    return model(**batch).logits


def loss_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with `model_logits`: masked models give logits at the labelled positions only."""
    return labels[labels != IGNORE_INDEX] if model.cfg.family == "masked" else labels


class DistillationLoss:
    """The training loop's loss_fn: (student, batch with the teacher's answer) -> (loss, {"kl", "ce"}).

    A batch without the teacher's keys (the validation batches) gets the student's own cross-entropy, so the
    loop's validation loss and perplexity mean what they mean in pre-training.
    """

    def __init__(self, alpha: float, temperature: float) -> None:
        check_distill_options(alpha, temperature)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | Losses:
        inputs = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
        if not any(key in batch for key in TEACHER_KEYS):
            return FAMILY_LOSSES[model.cfg.family](model, inputs)
        student = model_logits(model, inputs)
        labels = loss_labels(model, inputs["labels"])
        if TEACHER_LOGITS in batch:
            return distillation_loss(student, batch[TEACHER_LOGITS], labels, self.alpha, self.temperature)
        return sparse_distillation_loss(student, batch[TEACHER_VALUES], batch[TEACHER_INDICES], labels,
                                        self.alpha, self.temperature, batch.get(TEACHER_TAIL))


_BLOCK = re.compile(r"^(?P<stack>(?:.*\.)?blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def teacher_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher block each student block starts from: evenly spread, the first one kept (with half the blocks,
    every other one, as DistilBERT does)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def _block_counts(names: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            counts[match["stack"]] = max(counts.get(match["stack"], 0), int(match["index"]) + 1)
    return counts


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, list[int]]:
    """Start a student of the teacher's widths and fewer blocks from the teacher's own weights (Sanh et al. 2019):
    embeddings, norms and head as they are, and per stack evenly spread blocks (`teacher_layer_map`). A learned
    position table is cut to the student's context. Returns {stack: teacher block of each student block}."""
    source = teacher.state_dict()  # with a tied head under both names, for an untied student
    theirs, ours = _block_counts(source), _block_counts(model_tensors(student))
    for stack, count in ours.items():
        if count > theirs.get(stack, 0):
            raise UserError(f"the student has {count} blocks in '{stack}', the teacher {theirs.get(stack, 0)}; "
                            "starting from the teacher's blocks needs as many or fewer")
    layers = {stack: teacher_layer_map(count, theirs[stack]) for stack, count in ours.items()}
    weights = {}
    for name, tensor in model_tensors(student).items():
        match = _BLOCK.match(name)
        origin = f"{match['stack']}.{layers[match['stack']][int(match['index'])]}.{match['rest']}" if match else name
        if origin not in source:
            raise UserError(f"the teacher has no weight '{origin}' for the student's '{name}'; starting from the "
                            "teacher needs its architecture (--student teacher --student_model.n_layers N)")
        value = source[origin]
        if name.endswith("positions.learned.weight") and value.shape[1:] == tensor.shape[1:]:
            value = value[: tensor.shape[0]]
        if value.shape != tensor.shape:
            raise UserError(f"weight '{name}' is {tuple(tensor.shape)} in the student but {tuple(value.shape)} in the "
                            "teacher; starting from the teacher needs its widths (change only n_layers)")
        weights[name] = value.detach().to(tensor.device, tensor.dtype)
    load_model_tensors(student, weights, "the teacher")
    return layers


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes): what a teacher cache was made from,
    wherever the teacher's folder has moved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model_tensors(model).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherCache:
    """A folder of the teacher's top-k per micro-batch index (fp16 values, int32 indices, one safetensors file
    each) and a manifest of what it was made from; a folder made from anything else is refused.

    `record` names the teacher, its weights' digest, the seed, batch shape, K and data; the teacher's path is
    kept for the reader but not compared (the digest says whether it is the same teacher).
    """

    def __init__(self, folder: str | Path, record: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.record = {"format": CACHE_FORMAT, **record}
        manifest = self.folder / CACHE_MANIFEST
        if manifest.is_file():
            self._check(read_json_object(manifest, "teacher cache manifest", "delete the cache folder"))
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise UserError(f"--teacher_cache '{self.folder}' is a non-empty folder without {CACHE_MANIFEST}; "
                            "pass an empty or new folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(self.record, indent=1) + "\n"))

    def _check(self, made_from: dict[str, Any]) -> None:
        for key in sorted(set(self.record) | set(made_from)):
            if key != "teacher" and made_from.get(key) != self.record.get(key):
                raise UserError(f"teacher cache '{self.folder}' was made with {key}={_short(made_from.get(key))}, "
                                f"this run has {key}={_short(self.record.get(key))}; pass another --teacher_cache "
                                "folder or delete this one")

    def path(self, index: int) -> Path:
        return self.folder / f"topk-{index:08d}.safetensors"

    def read(self, index: int) -> dict[str, torch.Tensor] | None:
        """The tensors stored for micro-batch `index` (values fp16, indices int32, maybe the tail's log-mass),
        or None when it is not cached yet."""
        path = self.path(index)
        return read_safetensors(path) if path.is_file() else None

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        _write_atomically(self.path(index), lambda tmp: save_file(tensors, str(tmp)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _write_atomically(path: Path, write: Any) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written cache entry."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class TeacherBatches:
    """Callable: index -> the wrapped batch plus the frozen teacher's answer on it: full logits, or with
    top_k > 0 its top-k (values rounded to fp16 whether cached or not, so a cached and an uncached run train
    on the same numbers) and, given `temperature`, the log of its mass outside the top-k at that temperature
    (see `sparse_distillation_loss`). `teacher_calls` counts the teacher's forward passes."""

    def __init__(self, batches: Any, teacher: Model, *, top_k: int = 0, cache: TeacherCache | None = None,
                 temperature: float | None = None, precision: str = "fp32") -> None:
        check_distillable(teacher, "teacher")
        if top_k < 0 or top_k > teacher.cfg.vocab_size:
            raise UserError(f"top_k={top_k} must be between 0 (full logits) and the vocabulary size "
                            f"{teacher.cfg.vocab_size}")
        if cache is not None and top_k == 0:
            raise UserError("a teacher cache stores the teacher's top-k logits; pass --top_k K (e.g. 32) with it")
        self.batches, self.teacher, self.top_k, self.cache = batches, teacher, top_k, cache
        self.temperature, self.precision = temperature, precision
        self.teacher_calls = 0
        teacher.eval().requires_grad_(False)

    def __call__(self, index: int) -> dict[str, Any]:
        batch = self.batches(index)
        cached = self.cache.read(index) if self.cache is not None else None
        if cached is None:
            logits = self._teacher_logits(batch)
            if not self.top_k:
                return {**batch, TEACHER_LOGITS: logits}
            cached = self._top_k(logits)
            if self.cache is not None:
                self.cache.write(index, cached)
        answer = {TEACHER_VALUES: cached["values"].float(), TEACHER_INDICES: cached["indices"].long()}
        if "tail" in cached:
            answer[TEACHER_TAIL] = cached["tail"]
        return {**batch, **answer}

    def _top_k(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """What is kept (and cached) of the teacher's logits: fp16 top-k values, int32 indices, fp32 tail."""
        values, indices = logits.topk(self.top_k, dim=-1)
        kept = {"values": values.half(), "indices": indices.int()}
        if self.temperature is not None:
            kept["tail"] = teacher_tail(logits, indices, self.temperature)
        return kept

    @torch.no_grad()
    def _teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.teacher.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.teacher_calls += 1
        with autocast_for(device, self.precision):
            return model_logits(self.teacher, inputs).float()
