"""`lmforge evaluate` through a subprocess: model + task (table, JSON, shots curve), files + metric, and the
one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from rouge_score import rouge_scorer

from conftest import assert_one_line_error, make_model, run_cli
from lmforge.cli import main
from lmforge.evaluate import perplexity
from lmforge.interop import load, save_hf
from lmforge.tokenizer import train_char
from lmforge.train import save_checkpoint

QA = [("red", "left"), ("blue", "right"), ("green", "left"), ("black", "right"), ("white", "left")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random char-level checkpoint, a task's data and two task YAMLs (multiple choice, generation)."""
    root = tmp_path_factory.mktemp("evaluate")
    text = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in QA) + "To be, or not to be: that is the question.\n"
    tokenizer = train_char([text], specials={"eos": "</s>"})
    torch.manual_seed(0)
    model = make_model("tiny", vocab_size=tokenizer.vocab_size, context_length=64)
    save_checkpoint(root / "ckpt", model, tokenizer)
    data = root / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(json.dumps({"colour": q, "side": a, "blank": "q" if i % 2 else ""}) + "\n"
                                           for i, (q, a) in enumerate(QA)))
    (data / "plays.txt").write_text(text * 3)
    prompt = "prompt: {input: 'Question: {colour}', answer_prefix: 'Answer:'}\n"
    (root / "mc.yaml").write_text("kind: multiple_choice\ntest: {path: qa.jsonl}\nchoices: [left, right]\n"
                                  "label: side\n" + prompt)
    (root / "gen.yaml").write_text("kind: generate\nmetric: exact_match\ntest: {path: qa.jsonl}\n"
                                   "references: ['{side}']\ngeneration: {max_new_tokens: 6, stop: ['\\n']}\n" + prompt)
    (root / "blank.yaml").write_text(  # every answer extracts to "": right where the reference is "", so 3 of 5
        "kind: generate\nmetric: exact_match\ntest: {path: qa.jsonl}\nreferences: ['{blank}']\nextract: regex\n"
        "extract_regex: '^()'\ngeneration: {max_new_tokens: 1}\n" + prompt)
    return root


def test_evaluate_a_model_on_tasks_at_several_shot_counts(workspace):
    out = workspace / "report.json"
    result = run_cli("evaluate", "--task", *(str(workspace / f"{name}.yaml") for name in ("mc", "gen", "blank")),
                     "--model", str(workspace / "ckpt"), "--shots", "0,1", "--data_root", str(workspace / "data"),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "task" in result.stdout and "s/example" in result.stdout and "mc 1-shot: acc" in result.stdout
    report = json.loads(out.read_text())
    assert report["model_class"] == "CausalLM" and report["shots"] == [0, 1]
    for name, kind in (("mc", "multiple_choice"), ("gen", "generate")):
        task = report["tasks"][name]
        assert task["kind"] == kind and set(task["results"]) == {"0", "1"}
        one = task["results"]["1"]
        assert one["n"] == 5 and one["seconds"] > 0 and one["seconds_per_example"] > 0
        assert 0.0 <= one["score"] <= 100.0 and len(one["examples"]) == 5
        record = one["examples"][0]
        assert {"prompt", "prediction", "correct", "shots"} <= set(record) and record["shots"] == 1
    assert "loglikelihoods" in report["tasks"]["mc"]["results"]["0"]["examples"][0]
    assert report["tasks"]["gen"]["results"]["0"]["examples"][0]["references"] == ["left"]
    for name in ("mc", "gen", "blank"):
        for result in report["tasks"][name]["results"].values():
            correct = [r["correct"] for r in result["examples"]]
            assert result["score"] == pytest.approx(100 * sum(correct) / len(correct))
    choices = ["left", "right"]
    for result in report["tasks"]["mc"]["results"].values():
        for record in result["examples"]:
            scores = record["loglikelihoods"]
            assert len(scores) == 2 and record["prediction"] == max(range(2), key=scores.__getitem__)
            assert record["correct"] == (choices[record["prediction"]] == QA[record["index"]][1])
    for result in report["tasks"]["gen"]["results"].values():
        for record in result["examples"]:
            assert record["correct"] == (record["prediction"].strip().lower() == QA[record["index"]][1])
    assert [r["correct"] for r in report["tasks"]["blank"]["results"]["1"]["examples"]] == [True, False] * 2 + [True]
    assert out.with_suffix(".png").stat().st_size > 1000  # the shots curve, next to the JSON


def test_auto_start_is_lm_evals_for_hf_folders_and_lmforges_for_checkpoints(workspace, capsys):
    model, tokenizer = load(workspace / "ckpt")
    save_hf(workspace / "hf", model, tokenizer)  # the same weights and tokenizer as a Hugging Face folder
    reports = {}
    for name, model_dir, extra in (("ckpt", "ckpt", []), ("hf", "hf", []), ("hf-eos", "hf", ["--start", "eos"])):
        out = workspace / f"start-{name}.json"
        assert main(["evaluate", "--task", str(workspace / "mc.yaml"), "--model", str(workspace / model_dir),
                     "--data_root", str(workspace / "data"), "--out", str(out), *extra]) == 0
        table = capsys.readouterr().out
        reports[name] = json.loads(out.read_text())
        start = reports[name]["start"]
        assert start == ("tokenizer" if name == "hf" else "eos")
        assert reports[name]["tasks"]["mc"]["start"] == start
        assert f"start tokens: {start} (" in table.split("s/example", 1)[1]  # a line under the table
    assert "only what the tokenizer adds, here nothing" in reports["hf"]["start_tokens"]
    assert "every prompt starts after </s>" in reports["ckpt"]["start_tokens"]

    def scores(name):
        return [s for r in reports[name]["tasks"]["mc"]["results"]["0"]["examples"] for s in r["loglikelihoods"]]
    assert scores("hf-eos") == pytest.approx(scores("ckpt"), abs=1e-5)  # same weights, same convention
    assert max(abs(a - b) for a, b in zip(scores("hf"), scores("ckpt"), strict=True)) > 1e-3  # no EOS first


def test_perplexity_of_a_text_file(workspace, capsys):
    out = workspace / "ppl.json"
    assert main(["evaluate", "--task", "perplexity", "--data", str(workspace / "data" / "plays.txt"),
                 "--model", str(workspace / "ckpt"), "--stride", "16", "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    scores = next(iter(json.loads(out.read_text())["tasks"].values()))["results"]["0"]["scores"]
    assert scores["stride"] == 16 and scores["context"] == 64 and scores["perplexity"] > 1
    model, tokenizer = load(workspace / "ckpt")
    ids = tokenizer.encode((workspace / "data" / "plays.txt").read_text())
    expected = perplexity(model, ids, context=64, stride=16)
    assert scores["tokens"] == len(ids) - 1 == expected.tokens
    assert scores["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)


def test_score_files_with_a_metric_and_no_model(tmp_path, capsys):
    (tmp_path / "hyp.txt").write_text("a b c d e f\nthe cat sat on the mat\n")
    (tmp_path / "ref1.txt").write_text("a b c d e g\nthe cat sat on the mat\n")
    (tmp_path / "ref2.txt").write_text("a b c d e f\na cat sat on a mat\n")
    bleu = run_cli("evaluate", "--metric", "bleu", "--predictions", str(tmp_path / "hyp.txt"),
                   "--references", str(tmp_path / "ref1.txt"), str(tmp_path / "ref2.txt"),
                   "--out", str(tmp_path / "bleu.json"))
    assert bleu.returncode == 0, bleu.stderr
    assert "BLEU = 100.00" in bleu.stdout and "nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp" in bleu.stdout
    assert json.loads((tmp_path / "bleu.json").read_text())["bleu"]["bleu"] == pytest.approx(100.0)
    (tmp_path / "summaries.txt").write_text("a b x y e f\nthe cats were sitting on a red mat\n")  # stems, gaps
    assert main(["evaluate", "--metric", "rouge", "--predictions", str(tmp_path / "summaries.txt"),
                 "--references", str(tmp_path / "ref1.txt"), str(tmp_path / "ref2.txt"),
                 "--out", str(tmp_path / "rouge.json")]) == 0
    printed = capsys.readouterr().out
    assert "rouge1" in printed and "rougeL" in printed and "precision" in printed
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    hyps, refs1, refs2 = ((tmp_path / f).read_text().splitlines() for f in ("summaries.txt", "ref1.txt", "ref2.txt"))
    direct = [scorer.score_multi([r1, r2], h) for h, r1, r2 in zip(hyps, refs1, refs2, strict=True)]
    got = json.loads((tmp_path / "rouge.json").read_text())["rouge"]
    for kind in ("rouge1", "rouge2", "rougeL"):
        for part in ("precision", "recall", "fmeasure"):
            want = 100 * sum(getattr(s[kind], part) for s in direct) / len(direct)
            assert got[kind][part] == pytest.approx(want, abs=1e-9), (kind, part)
    assert all(0 < got[kind]["fmeasure"] < 100 for kind in got)  # partial matches: neither 0 nor 100


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "nope", "--model", "x"], "unknown task 'nope'; known tasks: dialogsum, gsm8k-cot, gsm8k"),
    (["--metric", "meteor", "--predictions", "p", "--references", "r"], "unknown metric 'meteor'; use one of rouge"),
    (["--metric", "bleu", "--predictions", "missing.txt", "--references", "r"],
     "predictions file 'missing.txt' does not exist"),
])
def test_mistakes_are_one_line_errors(args, message, tmp_path):
    result = run_cli("evaluate", *args, cwd=tmp_path)
    assert_one_line_error(result.stderr, message, result.returncode)


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "piqa", "--model", "x", "--data_root", "/nonexistent"],
     "task 'piqa' needs 'fewshot/piqa.valid.jsonl', which is not at /nonexistent/fewshot/piqa.valid.jsonl"),
    (["--task", "sst2", "--model", "x", "--shots", "0,five"], "--shots value 'five' is not a whole number"),
    (["--task", "perplexity", "--model", "x"], "--task perplexity needs --data TEXT_FILE"),
    (["--task", "sst2", "--metric", "bleu"], "give either --task (with --model) or --metric"),
    (["--task", "sst2", "--model", "x", "--start", "bos"], "--start=bos is not a start convention; use auto"),
    ([], "no task given; pass --task NAME_OR_YAML"),
])
def test_more_mistakes_in_process(args, message, capsys):
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
