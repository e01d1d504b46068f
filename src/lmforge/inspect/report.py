"""`report.html` of a run: one self-contained file (inline CSS, images as base64 data: URIs, no script, no
network) with the config, loss/throughput curves, samples under each decoding rule, attention and sampling
pictures, any evaluation reports the run folder holds, and the checkpoint's size."""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.generate import SamplingConfig, fill_mask, generate_text
from lmforge.inspect.attention import draw_attention
from lmforge.inspect.curves import draw_throughput, read_metrics
from lmforge.inspect.sampling import draw_sampling
from lmforge.interop import load, load_adapter
from lmforge.models import MaskedLM, Model, Seq2SeqLM
from lmforge.peft.methods import STATE_CONFIG as METHOD_FILE
from lmforge.plots import plot_loss_curve
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

REPORT_FILE = "report.html"
DECODING_RULES = {
    "greedy": dict(greedy=True),
    "temperature": dict(temperature=0.8),
    "top-k": dict(temperature=1.0, top_k=40),
    "top-p": dict(temperature=1.0, top_p=0.9),
}
# Files a run folder may hold with scores: lmforge evaluate's JSON, finetune's eval.json, the compression
# recipes' compression_report.json, and any other *_report.json.
Samples = dict[str, tuple[SamplingConfig, str]]  # rule name -> (its settings, the text it produced)
EVALUATION_PATTERNS = ("*_report.json", "eval.json", "evaluate*.json", "evaluate/*.json")
TABLE_ROWS = 80  # an evaluation table shows at most this many rows (per-example lists are left out)
STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #1f77b4; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px;
text-align: left; vertical-align: top; } th { background: #f2f2f2; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; font-size: 0.85em; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; } .row table { font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; } .note { color: #777; }
"""


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], pre_columns: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in headers)
    def cell(column: int, value: Any) -> str:
        return f"<td><pre>{_escape(value)}</pre></td>" if column in pre_columns else f"<td>{_escape(value)}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(png: Path | None, alt: str) -> str:
    if png is None or not png.is_file():
        return f'<p class="note">{_escape(alt)}: nothing to draw</p>'
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{_escape(alt)}" src="data:image/png;base64,{data}">'


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, scalar) pairs of nested dicts; lists of scalars shortened, lists of records left out."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            shown = ", ".join(map(str, value[:8])) + (f", … ({len(value)} values)" if len(value) > 8 else "")
            yield prefix, f"[{shown}]"
    else:
        yield prefix, value


def _number(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def model_folder(run: Path) -> Path | None:
    """The run's model: RUN/checkpoint (pretrain, finetune), or RUN itself when it is a model folder."""
    for folder in (run / "checkpoint", run):
        if (folder / "config.json").is_file():
            return folder
    return None


def _config_section(run: Path, checkpoint: Path | None) -> str:
    """Each config file of the run (and the model's config) as a key/value table, side by side."""
    files = [(path.name, path) for path in sorted(run.glob("*config*.json"))]
    for name in ("config.json", METHOD_FILE) if checkpoint is not None else ():
        if (checkpoint / name).is_file():
            files.append((f"model: {checkpoint.name}/{name}", checkpoint / name))
    tables = []
    for title, path in files:
        rows = [[key, value] for key, value in _flatten(read_json_object(path, "run config"))]
        tables.append(f'<div><h3>{_escape(title)}</h3>{_table(["key", "value"], rows)}</div>')
    return f'<div class="row">{"".join(tables)}</div>' if tables else '<p class="note">no config files</p>'


def _training_section(records: list[dict[str, Any]], metrics: Path, work: Path) -> str:
    losses = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    mfus = [r["mfu"] for r in records if "mfu" in r]
    rows = [["steps logged", losses[-1]["step"]], ["final train loss", _number(losses[-1]["loss"])]]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        rows += [["final validation loss", _number(vals[-1]["val_loss"])],
                 ["best validation loss", f"{best['val_loss']:.4g} (step {best['step']})"]]
    if speeds:
        rows.append(["throughput (tokens/s, mean / last)", f"{sum(speeds) / len(speeds):,.0f} / {speeds[-1]:,.0f}"])
    if mfus:
        rows.append(["MFU (mean / last)", f"{sum(mfus) / len(mfus):.2%} / {mfus[-1]:.2%}"])
    loss_png = plot_loss_curve(metrics, work / "loss.png", "loss: train and validation")
    speed_png = draw_throughput(records, work / "throughput.png")
    return (_table(["measure", "value"], rows) + _image(loss_png, "loss curves")
            + (_image(speed_png, "throughput and MFU") if speed_png else
               '<p class="note">the run logged no tokens/s (no tokens_per_step given to the training loop)</p>'))


def default_prompt(model: Model, tokenizer: Tokenizer) -> str:
    """A short code prompt in the form the family reads: a [MASK] for an encoder, a sentinel span for T5."""
    if isinstance(model, MaskedLM) and tokenizer.specials.get("mask"):
        return f"import os . path . {tokenizer.specials['mask']}"
    if isinstance(model, Seq2SeqLM) and tokenizer.sentinel_ids:
        return f"def {tokenizer.decode(tokenizer.sentinel_ids[:1])}(self):"
    return "def greet(self, name):\n    return"


def settings_text(sampling: SamplingConfig) -> str:
    if sampling.is_greedy:
        return "argmax"
    return (f"T={sampling.temperature:g}, top_k={sampling.top_k or 'off'}, top_p={sampling.top_p:g}, "
            f"seed={sampling.seed}")


def _samples_section(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int,
                     given: Samples | None) -> str:
    if isinstance(model, MaskedLM):
        fills = fill_mask(model, tokenizer, prompt)
        rows = [[n, ", ".join(f"{t!r} {p:.2f}" for t, p in guesses)] for n, guesses in enumerate(fills, start=1)]
        return f"<p>prompt:</p><pre>{_escape(prompt)}</pre>" + _table(["mask", "guesses (probability)"], rows)
    if not isinstance(model, Seq2SeqLM) and not hasattr(model, "lm_head"):
        return f'<p class="note">a {_escape(type(model).__name__)} does not generate text</p>'
    if given is None:
        given = {}
        for name, rule in DECODING_RULES.items():
            sampling = SamplingConfig(**rule, max_new_tokens=max_new_tokens, seed=seed)
            given[name] = (sampling, generate_text(model, tokenizer, prompt, sampling)[0])
    rows = [[name, settings_text(sampling), text] for name, (sampling, text) in given.items()]
    return (f"<p>prompt ({max_new_tokens} new tokens at most):</p><pre>{_escape(prompt)}</pre>"
            + _table(["rule", "settings", "sample"], rows, pre_columns=(2,)))


def _pictures_section(model: Model, tokenizer: Tokenizer, prompt: str, work: Path) -> str:
    parts = []
    if any(name.endswith("attn") for name, _ in model.named_modules()):
        parts += [_image(png, png.stem.replace("_", " ")) for png in draw_attention(model, tokenizer, prompt, work)]
    else:
        parts.append('<p class="note">this model has no attention</p>')
    if hasattr(model, "lm_head"):
        parts.append(_image(draw_sampling(model, tokenizer, prompt, work), "next-token distribution under each rule"))
    return "".join(parts)


def _evaluation_section(run: Path) -> str:
    files = sorted({p for pattern in EVALUATION_PATTERNS for p in run.glob(pattern) if p.is_file()})
    parts = []
    for path in files:
        report = read_json_object(path, "evaluation report")
        rows = [[key, _number(value)] for key, value in _flatten(report)]
        more = f'<p class="note">{len(rows) - TABLE_ROWS} more rows in the file</p>' if len(rows) > TABLE_ROWS else ""
        parts.append(f"<h3>{_escape(path.relative_to(run))}</h3>" + _table(["key", "value"], rows[:TABLE_ROWS]) + more)
    return "".join(parts) or '<p class="note">no evaluation reports (*_report.json, eval.json) in the run folder</p>'


def _size_section(model: Model, checkpoint: Path) -> str:
    files = [f for f in checkpoint.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files  # the model's tensors, not the optimizer's (trainer_state)
                  if f.suffix in (".safetensors", ".bin", ".pt") and not f.name.startswith("trainer_state"))
    total = sum(f.stat().st_size for f in files)
    rows = [["parameters", f"{model.num_parameters():,}"],
            ["weights on disk", f"{weights / 2**20:.2f} MiB ({weights:,} bytes)"],
            ["checkpoint folder on disk", f"{total / 2**20:.2f} MiB, {len(files)} files"]]
    rows += [[f.name, f"{f.stat().st_size:,} bytes"] for f in sorted(files)]
    return _table(["", ""], rows)


def _run_model(run: Path, base: str | None) -> tuple[Model, Tokenizer, Path] | str:
    """(model, tokenizer, its folder) of the run, or a note saying why there is none. A PEFT fine-tune's
    checkpoint holds only the method's tensors (method.json): they go onto `base`."""
    folder = model_folder(run)
    method_folder = run / "checkpoint"
    if folder is not None:
        model, tokenizer = load(folder)
    elif (method_folder / METHOD_FILE).is_file():
        if base is None:
            return (f"this run's checkpoint holds a fine-tuning method's tensors only ({METHOD_FILE}); pass --base "
                    "BASE_MODEL for samples and pictures")
        model, tokenizer = load(base)
        model = load_adapter(model, method_folder)
        if (method_folder / TOKENIZER_FILE).is_file():
            tokenizer = Tokenizer.load(method_folder)
        folder = method_folder
    else:
        return "no checkpoint in the run folder: no samples or pictures"
    if tokenizer is None:
        raise UserError(f"'{folder}' has no tokenizer.json; the report's samples need it")
    return model.eval(), tokenizer, folder


def build_report(run: Path, prompt: str | None, max_new_tokens: int, seed: int, work: Path,
                 samples: Samples | None = None, base: str | None = None) -> str:
    records = read_metrics(run / "metrics.jsonl")
    found = _run_model(run, base)
    folder = None if isinstance(found, str) else found[2]
    sections = [("Config", _config_section(run, folder)),
                ("Training", _training_section(records, run / "metrics.jsonl", work))]
    if isinstance(found, str):
        sections.append(("Model", f'<p class="note">{_escape(found)}</p>'))
    else:
        model, tokenizer, folder = found
        prompt = prompt if prompt is not None else default_prompt(model, tokenizer)
        sections += [("Checkpoint", _size_section(model, folder)),
                     ("Samples under each decoding rule", _samples_section(model, tokenizer, prompt, max_new_tokens,
                                                                           seed, samples)),
                     ("Attention and next-token pictures", f"<p>prompt:</p><pre>{_escape(prompt)}</pre>"
                      + _pictures_section(model, tokenizer, prompt, work))]
    sections.append(("Evaluation", _evaluation_section(run)))
    body = "".join(f"<h2>{_escape(title)}</h2>{content}" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lmforge run: {_escape(run.name)}'
            f"</title><style>{STYLE}</style></head><body><h1>lmforge run: {_escape(run.resolve())}</h1>{body}"
            "</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, prompt: str | None = None,
                 max_new_tokens: int = 40, seed: int = 0, samples: Samples | None = None,
                 base: str | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) atomically: a reader sees the old file or the whole new one.
    `samples` (rule name -> (settings, text)) are shown instead of sampling again (the demo has them); `base` is
    the base model of a PEFT fine-tune run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"'{run}' is not a folder; give a run folder (the --out_dir of pretrain or finetune)")
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"'{run}' has no metrics.jsonl; give a run folder written by lmforge pretrain or finetune")
    target = Path(out) if out else run / REPORT_FILE
    with tempfile.TemporaryDirectory(prefix="lmforge-report-") as work:
        page = build_report(run, prompt, max_new_tokens, seed, Path(work), samples, base)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
