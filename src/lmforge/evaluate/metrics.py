"""The numbers the field reports: perplexity, ROUGE (`rouge-score`), BLEU (`sacrebleu`), exact match, accuracy.

ROUGE and BLEU are only ever computed by their reference packages; this module arranges inputs and
averages. Scores are on a 0-100 scale (as papers and sacrebleu print them); perplexity is a ratio.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.models import CausalLM, Model

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# -- perplexity ---------------------------------------------------------------------------------------------------
@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # tokens scored (all but the first)
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window: inputs ids[begin:end] predict ids[begin+1:end+1], of which the last `new`
    are scored. Every token after the first is scored exactly once, with up to `context` tokens of left
    context; stride == context chops the text into independent windows."""
    plan, begin, scored_until = [], 0, 1
    while True:
        end = min(begin + context, n_tokens - 1)
        plan.append((begin, end, end + 1 - scored_until))
        scored_until = end + 1
        if end == n_tokens - 1:
            return plan
        begin += stride


@torch.inference_mode()
def perplexity(model: CausalLM, token_ids: Sequence[int] | torch.Tensor, context: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> Perplexity:
    """exp(mean NLL) of a token sequence with a sliding window (HF's "perplexity of fixed-length models").

    context defaults to the model's context_length, stride to half of it (each scored token then sees at
    least context - stride tokens); the windows run in batches.
    """
    if not isinstance(model, CausalLM):
        raise UserError(f"perplexity needs a causal (decoder-only) model; this is a {type(model).__name__}")
    context = context or model.token_room
    stride = stride or max(1, context // 2)
    if not 1 <= context <= model.token_room:
        raise UserError(f"context={context} must be in [1, {model.token_room}] (the model's {model.room_text})")
    if not 1 <= stride <= context:
        raise UserError(f"stride={stride} must be in [1, context={context}]")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if len(ids) < 2:
        raise UserError(f"perplexity needs at least 2 tokens of text, got {len(ids)}; give a longer text")
    model.eval()
    plan = window_plan(len(ids), context, stride)
    total = 0.0
    for start in range(0, len(plan), batch_size):
        total += _windows_nll(model, ids, plan[start:start + batch_size])
    nll = total / (len(ids) - 1)
    return Perplexity(math.exp(nll), nll, len(ids) - 1, len(plan), context, stride)


def _windows_nll(model: CausalLM, ids: torch.Tensor, windows: list[tuple[int, int, int]]) -> float:
    """Summed NLL of the scored tokens of some windows, run as one right-padded batch (causal: padding on the
    right cannot change the positions before it)."""
    width = max(end - begin for begin, end, _ in windows)
    inputs = torch.zeros((len(windows), width), dtype=torch.long)
    labels = torch.full((len(windows), width), -100, dtype=torch.long)
    for row, (begin, end, new) in enumerate(windows):
        inputs[row, :end - begin] = ids[begin:end]
        labels[row, end - begin - new:end - begin] = ids[end + 1 - new:end + 1]
    device = model.embed.weight.device
    logits = model(inputs.to(device)).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100,
                           reduction="sum").item()


# -- ROUGE and BLEU through their reference packages ----------------------------------------------------------------
def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references; give one (list of) "
                        "reference(s) per prediction")
    if not predictions:
        raise UserError("no predictions to score; give at least one")
    for number, refs in enumerate(references, start=1):
        if not [r for r in refs if r is not None]:
            raise UserError(f"example {number} has no reference; every prediction needs at least one")


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = True,
                 types: Sequence[str] = ROUGE_TYPES) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """(corpus, per-example). With several references an example takes, per ROUGE type, the reference with the
    best F1 (`RougeScorer.score_multi`); the corpus score is the mean over examples, x100."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    per_example = [scorer.score_multi([r for r in refs if r is not None], pred)
                   for pred, refs in zip(predictions, references, strict=True)]
    corpus = {kind: {part: 100 * sum(getattr(s[kind], part) for s in per_example) / len(per_example)
                     for part in ("precision", "recall", "fmeasure")} for kind in types}
    flat = [{kind: 100 * float(s[kind].fmeasure) for kind in types} for s in per_example]
    return corpus, flat


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = True,
          types: Sequence[str] = ROUGE_TYPES) -> dict[str, dict[str, float]]:
    """Corpus ROUGE-1/2/L: {type: {precision, recall, fmeasure}}, each the mean over examples, x100."""
    return rouge_scores(predictions, references, use_stemmer, types)[0]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: str | None = None,
         lowercase: bool = False) -> dict[str, Any]:
    """Corpus BLEU by sacrebleu (default 13a tokenisation, exp smoothing), with its signature.

    references[i] holds example i's references; examples may have different numbers of them.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    width = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    result = metric.corpus_score(list(predictions), streams)
    return {"bleu": result.score, "signature": str(metric.get_signature()), "precisions": result.precisions,
            "bp": result.bp, "sys_len": result.sys_len, "ref_len": result.ref_len}


# -- exact match, accuracy, answer extraction -------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"(?:####|[Tt]he (?:final )?answer is:?)\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str:
    """'$1,000.00' -> '1000'; '-3.50' -> '-3.5' (GSM8K answers are compared as numbers, not strings)."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value == int(value) else repr(value)


def extract_number(text: str) -> str:
    """The answer of a worked solution: the number after '####' or 'The answer is', else the last number."""
    marked = _FINAL.findall(text)
    if marked:
        return normalize_number(marked[0])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else ""


def normalize_text(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not decide an exact match."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]], normalize: bool = True) -> float:
    """Share (x100) of predictions equal to any of their references, after `normalize_text` unless told not to."""
    _check_pairs(predictions, references)
    norm = normalize_text if normalize else (lambda s: s)
    hits = sum(norm(p) in {norm(r) for r in refs if r is not None}
               for p, refs in zip(predictions, references, strict=True))
    return 100 * hits / len(predictions)


def accuracy(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    """Share (x100) of positions where predicted equals gold (class ids or labels)."""
    if len(predicted) != len(gold) or not gold:
        raise UserError(f"accuracy needs equally many predictions and labels, got {len(predicted)} and {len(gold)}")
    return 100 * sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


@torch.no_grad()
def classifier_accuracy(model: Model, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Run a sequence classifier over labelled batches (input_ids, attention_mask, labels) and return
    `accuracy` of its argmax predictions: a percentage, like every score here."""
    model.eval()
    device = next(model.parameters()).device
    predicted: list[int] = []
    gold: list[int] = []
    for batch in batches:
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predicted += logits.argmax(-1).tolist()
        gold += batch["labels"].tolist()
    return accuracy(predicted, gold)
