"""The zero/one/few-shot harness: a task, a model and a list of shot counts in; scores, timings and every
example's prompt, prediction and reference out (a dict that is the JSON report), plus a table and a curve.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.evaluate import metrics
from lmforge.evaluate.prompts import Example, build_prompt, draw_shots
from lmforge.evaluate.scoring import (
    check_start,
    describe_start,
    encode,
    generate_answers,
    prompt_tokens,
    require_lm,
    score_choices,
)
from lmforge.evaluate.tasks import Task
from lmforge.models import Model, Seq2SeqLM
from lmforge.tokenizer import Tokenizer


def evaluate_task(model: Model, tokenizer: Tokenizer, task: Task, shots: Sequence[int] = (0,), limit: int | None = None,
                  seed: int = 1234, batch_size: int = 8, context: int | None = None, stride: int | None = None,
                  rouge_stemmer: bool = True, log: Callable[[str], None] | None = print,
                  start: str = "eos") -> dict[str, Any]:
    """{kind, metric, source, start, results: {shots: {score, scores, n, seconds, seconds_per_example, examples}}}.
    `start` is the convention for what prompts start with (see `lmforge.evaluate.scoring`): "tokenizer" for
    lm-evaluation-harness's numbers, "eos" (lmforge's) for models trained on EOS-separated documents."""
    require_lm(model)
    check_start(start)
    spec = task.spec
    if spec.prompt.chain_of_thought and spec.kind == "multiple_choice":
        raise UserError(f"task '{task.name}': chain_of_thought needs a generate task (multiple choice scores the "
                        "choices directly)")
    report: dict[str, Any] = {"kind": spec.kind, "metric": task.metric, "source": task.source, "results": {}}
    if spec.kind != "perplexity":  # perplexity scores a token stream; no prompt, so no start convention
        report.update(start=start, start_tokens=describe_start(model, tokenizer, start))
    if spec.kind == "perplexity":
        report["results"]["0"] = _perplexity(model, tokenizer, task, limit, batch_size, context, stride)
        _say(log, task.name, 0, report["results"]["0"], task.metric)
        return report
    examples = task.examples(limit)
    if not examples:
        raise UserError(f"task '{task.name}' has no examples to evaluate; check its test data (and --limit)")
    if spec.kind == "multiple_choice":
        report["chance"] = chance_level(task, examples)
    pool = task.pool() if max(shots, default=0) > 0 else []
    for k in shots:
        result = _run_shots(model, tokenizer, task, examples, pool, k, seed, batch_size, rouge_stemmer, start)
        report["results"][str(k)] = result
        _say(log, task.name, k, result, task.metric)
    return report


def _say(log: Callable[[str], None] | None, name: str, k: int, result: dict[str, Any], metric: str) -> None:
    if log is None:
        return
    shots = "" if metric == "perplexity" else f" {k}-shot"
    log(f"{name}{shots}: {metric} {result['score']:.2f} (n={result['n']}, {result['seconds']:.1f} s)")
    if "bleu" in result:
        log(f"  sacrebleu signature: {result['bleu']['signature']}")


def _run_shots(model: Model, tokenizer: Tokenizer, task: Task, examples: list[Example], pool: list[Example], k: int,
               seed: int, batch_size: int, rouge_stemmer: bool, start: str) -> dict[str, Any]:
    spec = task.spec
    began = time.perf_counter()
    prompts = [build_prompt(spec.prompt, ex, draw_shots(pool, k, seed, ex, spec.prompt),
                            _fits(model, tokenizer, task, ex, start)) for ex in examples]
    if spec.kind == "multiple_choice":
        result = _multiple_choice(model, tokenizer, task, examples, [p.text for p in prompts], batch_size, start)
    else:
        result = _generation(model, tokenizer, task, examples, [p.text for p in prompts], batch_size, rouge_stemmer,
                             start)
    seconds = time.perf_counter() - began
    for record, prompt in zip(result["examples"], prompts, strict=True):
        record.update(shots=len(prompt.shots), shot_ids=prompt.shots, prompt=prompt.text,
                      truncated=record["truncated"] or not prompt.fits)
    result.update(n=len(examples), seconds=seconds, seconds_per_example=seconds / max(1, len(examples)),
                  mean_shots=sum(len(p.shots) for p in prompts) / max(1, len(prompts)),
                  truncated=sum(r["truncated"] for r in result["examples"]))
    return {"score": result.pop("score"), **result}


def _fits(model: Model, tokenizer: Tokenizer, task: Task, example: Example, start: str) -> Callable[[str], bool]:
    """Whether a prompt leaves room in the context for this example's answer (its longest choice, or
    max_new_tokens); an encoder-decoder only needs the prompt to fit the encoder."""
    limit = model.token_room
    if isinstance(model, Seq2SeqLM):
        return lambda text: model.cfg.positions == "relative" or len(encode(tokenizer, text)) + 1 <= limit
    if task.spec.kind == "multiple_choice":
        delimiter = task.spec.prompt.target_delimiter
        reserve = max(len(encode(tokenizer, delimiter + c)) for c in example.choices or [""])
    else:
        reserve = task.spec.generation.max_new_tokens
    return lambda text: len(prompt_tokens(model, tokenizer, text, start)) + reserve <= limit


def _multiple_choice(model: Model, tokenizer: Tokenizer, task: Task, examples: list[Example], prompts: list[str],
                     batch_size: int, start: str) -> dict[str, Any]:
    delimiter = task.spec.prompt.target_delimiter
    scored = score_choices(model, tokenizer, prompts, [ex.choices or [] for ex in examples], delimiter, batch_size,
                           start)
    records = [{"index": ex.index, "choices": ex.choices, "label": ex.label, "loglikelihoods": s.loglikelihoods,
                "prediction": s.prediction, "prediction_norm": s.prediction_norm, "greedy": s.greedy,
                "correct": s.prediction == ex.label, "correct_norm": s.prediction_norm == ex.label,
                "truncated": s.truncated} for ex, s in zip(examples, scored, strict=True)]
    gold = [ex.label for ex in examples]
    scores = {"acc": metrics.accuracy([s.prediction for s in scored], gold),
              "acc_norm": metrics.accuracy([s.prediction_norm for s in scored], gold)}
    return {"score": scores[task.metric], "scores": scores, "examples": records}


def extract_answer(text: str, how: str, regex: str = "") -> str:
    """The part of a generation that is compared with the reference."""
    if how == "number":
        return metrics.extract_number(text)
    if how == "first_line":
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    if how == "regex":
        found = re.search(regex, text, re.DOTALL)
        return (found.group(1) if found.groups() else found.group(0)).strip() if found else ""
    return text.strip()


def _generation(model: Model, tokenizer: Tokenizer, task: Task, examples: list[Example], prompts: list[str],
                batch_size: int, rouge_stemmer: bool, start: str) -> dict[str, Any]:
    spec = task.spec
    outputs = generate_answers(model, tokenizer, prompts, spec.generation, batch_size, start)
    answers = [extract_answer(text, spec.extract, spec.extract_regex) for text, _ in outputs]
    references = [[_gold(r, spec.extract) for r in ex.references] for ex in examples]
    records = [{"index": ex.index, "generated": text, "prediction": answer, "references": refs, "truncated": cut}
               for ex, (text, cut), answer, refs in zip(examples, outputs, answers, references, strict=True)]
    if task.metric == "rouge":
        corpus, per_example = metrics.rouge_scores(answers, references, rouge_stemmer)
        for record, row in zip(records, per_example, strict=True):
            record.update(row)
        scores = {kind: parts["fmeasure"] for kind, parts in corpus.items()}
        return {"score": scores["rougeL"], "scores": scores, "rouge": corpus, "examples": records}
    if task.metric == "bleu":
        result = metrics.bleu(answers, references)
        return {"score": result["bleu"], "scores": {"bleu": result["bleu"]}, "bleu": result, "examples": records}
    norm = metrics.normalize_text
    for record in records:
        record["correct"] = norm(record["prediction"]) in {norm(r) for r in record["references"]}
    score = 100 * sum(r["correct"] for r in records) / max(1, len(records))
    return {"score": score, "scores": {"exact_match": score}, "examples": records}


def _gold(reference: str, how: str) -> str:
    return metrics.normalize_number(reference) if how == "number" else reference.strip()


def _perplexity(model: Model, tokenizer: Tokenizer, task: Task, limit: int | None, batch_size: int,
                context: int | None, stride: int | None) -> dict[str, Any]:
    start = time.perf_counter()
    ids = [t for text in task.texts() for t in encode(tokenizer, text)]
    ids = ids[:limit] if limit else ids
    result = metrics.perplexity(model, ids, context, stride, batch_size).to_dict()
    seconds = time.perf_counter() - start
    return {"score": result["perplexity"], "scores": result, "n": result["tokens"], "seconds": seconds,
            "seconds_per_example": seconds / max(1, result["tokens"]), "examples": []}


# -- reports --------------------------------------------------------------------------------------------------------
def report_rows(tasks: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, task in tasks.items():
        for k, r in task["results"].items():
            shots = "-" if task["kind"] == "perplexity" else k
            rows.append([name, shots, task["metric"], round(r["score"], 2), r["n"],
                         round(r.get("mean_shots", 0.0), 2), r.get("truncated", 0), round(r["seconds_per_example"], 4)])
    return rows


ROW_HEADERS = ["task", "shots", "metric", "score", "n", "shots used", "truncated", "s/example"]


def start_note(tasks: dict[str, dict[str, Any]]) -> str | None:
    """The line under the table that says which start convention the prompts used (None: only perplexity)."""
    notes = sorted({task["start_tokens"] for task in tasks.values() if "start_tokens" in task})
    return "\n".join(f"start tokens: {note}" for note in notes) or None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] = str) -> str:
    """Fixed-width text table, numbers right-aligned; `cell` turns each value into its text."""
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def plot_shots_curve(tasks: dict[str, dict[str, Any]], png: str | Path, title: str = "score against shots") -> Path:
    """Headline score against the number of in-context examples, one line per task."""
    from lmforge.plots import plt  # Agg backend, set once by lmforge.plots

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    shots: set[int] = set()
    for name, task in tasks.items():
        if task["kind"] == "perplexity":
            continue
        points = sorted((int(k), r["score"]) for k, r in task["results"].items())
        shots.update(k for k, _ in points)
        line = ax.plot(*zip(*points, strict=True), "o-", label=f"{name} ({task['metric']})")[0]
        if task.get("chance") is not None:
            ax.axhline(task["chance"], linestyle=":", linewidth=1, color=line.get_color())
    ax.set_xticks(sorted(shots))
    ax.set_xlabel("examples in the prompt (shots)")
    ax.set_ylabel("score, 0-100 (dotted: chance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def chance_level(task: Task, examples: list[Example] | None = None) -> float | None:
    """Accuracy of guessing uniformly among the choices (multiple choice only), x100."""
    if task.spec.kind != "multiple_choice":
        return None
    examples = examples if examples is not None else task.examples()
    return 100 * sum(1 / len(ex.choices or [1]) for ex in examples) / max(1, len(examples))


__all__ = ["ROW_HEADERS", "chance_level", "evaluate_task", "extract_answer", "format_table",
           "plot_shots_curve", "report_rows", "start_note"]
