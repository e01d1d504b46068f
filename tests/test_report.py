"""`lmforge report RUN_DIR`: one self-contained report.html. Parsed with html.parser: nothing is fetched (no
http(s), no file references, no script), every image is an embedded PNG that decodes, and the page holds the
run's config, curves, throughput/MFU, samples under each decoding rule, attention pictures, evaluation tables and
the checkpoint's size."""

import base64
import html
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_inspect import write_run

import lmforge
from conftest import SAMPLE_TEXT, run_cli
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate_text
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.recipes.report import ReportConfig, run_report
from lmforge.train import TrainConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REFERENCE_ATTRIBUTES = {"src", "href", "srcset", "poster", "data", "action", "background", "formaction"}
PROMPT = "def greet(self):"


class Page(HTMLParser):
    """Every tag with its attributes, and the text of <style> blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def assert_self_contained(path: Path) -> list[dict[str, str]]:
    """No reference leaves the file; every <img> is a decodable PNG data: URI. Returns the images' attributes."""
    page = parse(path)
    assert not [t for t, _ in page.tags if t in {"script", "link", "iframe", "object", "embed"}]
    assert not any("url(" in style or "@import" in style for style in page.styles)
    for tag, attrs in page.tags:
        for name in REFERENCE_ATTRIBUTES & set(attrs):
            assert attrs[name].startswith("data:image/png;base64,"), (tag, name, attrs[name][:80])
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    for attrs in images:
        data = base64.b64decode(attrs["src"].removeprefix("data:image/png;base64,"), validate=True)
        assert data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and float(image[..., :3].std()) > 0.01
    return images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (tiny) pretrain run folder, plus an evaluation report planted in it."""
    root = tmp_path_factory.mktemp("report")
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    cfg = PretrainConfig(out_dir=str(root / "run"), data=DataConfig(sources=[str(root / "corpus.txt")],
                                                                    val_fraction=0.2),
                         tokenizer=TokenizerConfig(vocab_size=300), model={"preset": "tiny", "context_length": 32},
                         train=TrainConfig(steps=4, batch_size=4, eval_every=2, log_every=1, progress=False))
    pretrain(cfg)
    (root / "run" / "compression_report.json").write_text(json.dumps(
        {"kind": "int8", "perplexity": {"original": 41.25, "compressed": 41.5}, "per_example": [{"x": 1}]}))
    return root / "run"


@pytest.fixture(scope="module")
def report(run):
    """Written by `lmforge report RUN_DIR`, as a user runs it."""
    result = run_cli("report", str(run), "--prompt", PROMPT, "--max_new_tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"report -> {run / 'report.html'}\n"
    return run / "report.html"


def test_the_report_embeds_everything_it_shows(report, run):
    assert report == run / "report.html"
    alts = [attrs["alt"] for attrs in assert_self_contained(report)]
    assert alts == ["loss curves", "throughput and MFU", "attention decoder",
                    "next-token distribution under each rule"]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # the atomic write left nothing behind


def test_the_report_holds_config_curves_samples_evaluation_and_size(report, run):
    text = report.read_text(encoding="utf-8")
    config = json.loads((run / "pretrain_config.json").read_text())
    assert "<td>train.lr</td>" in text and f"<td>{config['train']['lr']}</td>" in text
    assert "<td>d_model</td><td>64</td>" in text  # the model's own config
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])
    assert f"{best['val_loss']:.4g} (step {best['step']})" in text
    assert "MFU (mean / last)" in text and "throughput (tokens/s, mean / last)" in text
    model, tokenizer = lmforge.load(run / "checkpoint")
    greedy = generate_text(model, tokenizer, PROMPT, SamplingConfig(greedy=True, max_new_tokens=6))[0]
    assert f"<td>greedy</td><td>argmax</td><td><pre>{html.escape(greedy)}</pre></td>" in text
    for settings in ("T=0.8, top_k=off, top_p=1", "T=1, top_k=40, top_p=1", "T=1, top_k=off, top_p=0.9"):
        assert settings in text
    assert "<td>perplexity.original</td><td>41.25</td>" in text and "per_example" not in text
    weights = (run / "checkpoint" / "model.safetensors").stat().st_size
    assert f"({weights:,} bytes)" in text and f"<td>{model.num_parameters():,}</td>" in text


@pytest.mark.parametrize("family", ["masked", "seq2seq"])
def test_encoder_and_encoder_decoder_runs_get_a_report(tmp_path, family, capsys):
    write_run(tmp_path / "run", family)
    out = tmp_path / "elsewhere" / "page.html"
    assert run_report(ReportConfig(run_dir=str(tmp_path / "run"), out=str(out), max_new_tokens=4)) == out
    assert capsys.readouterr().out.strip() == f"report -> {out}"
    alts = [attrs["alt"] for attrs in assert_self_contained(out)]
    kinds = ["encoder"] if family == "masked" else ["encoder", "decoder", "cross"]
    assert alts[2:-1] == [f"attention {kind}" for kind in kinds]
    text = out.read_text(encoding="utf-8")
    assert ("guesses (probability)" in text) == (family == "masked")


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    (tmp_path / "run").mkdir()
    for folder, message in [(tmp_path / "run", "has no metrics.jsonl"), (tmp_path / "nowhere", "is not a folder")]:
        with pytest.raises(UserError, match=message) as caught:
            run_report(ReportConfig(run_dir=str(folder)))
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="max_new_tokens=0 must be >= 1"):
        ReportConfig(run_dir=str(tmp_path), max_new_tokens=0)


def test_a_peft_run_shows_its_adapter_on_the_base_given(tmp_path):
    from lmforge.peft.methods import apply_method, save_method_state

    base = write_run(tmp_path / "base", "causal")
    model, tokenizer = lmforge.load(base)
    model = apply_method(model, "lora", r=2)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:  # LoRA's B starts at zero: give the adapter an effect to show
            parameter.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_method_state(tmp_path / "ft" / "checkpoint", model, also=tokenizer.save)
    (tmp_path / "ft" / "metrics.jsonl").write_text((tmp_path / "base" / "metrics.jsonl").read_text())
    note = run_report(ReportConfig(run_dir=str(tmp_path / "ft")))
    assert "pass --base BASE_MODEL for samples and pictures" in note.read_text(encoding="utf-8")
    page = run_report(ReportConfig(run_dir=str(tmp_path / "ft"), base=str(base), prompt=PROMPT, max_new_tokens=5))
    text = page.read_text(encoding="utf-8")
    greedy = generate_text(model.eval(), tokenizer, PROMPT, SamplingConfig(greedy=True, max_new_tokens=5))[0]
    plain = generate_text(lmforge.load(base)[0], tokenizer, PROMPT, SamplingConfig(greedy=True, max_new_tokens=5))[0]
    assert greedy != plain  # so the next line shows the adapter was applied
    assert f"<td>greedy</td><td>argmax</td><td><pre>{html.escape(greedy)}</pre></td>" in text
    assert "<h3>model: checkpoint/method.json</h3>" in text
