"""`lmforge` end to end through a subprocess, including the one-line errors (exit status 2)."""

import json

import pytest

import lmforge
from conftest import SAMPLE_TEXT, assert_one_line_error, run_cli
from lmforge import SamplingConfig

run = run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "code.py").write_text(SAMPLE_TEXT)
    return folder / "code.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One tiny pre-training run shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    config = out / "run.yaml"
    config.write_text(
        f"out_dir: {out / 'pt'}\n"
        f"data:\n  sources: [{corpus}]\n  val_fraction: 0.1\n"
        "tokenizer:\n  kind: char\n"
        "model:\n  preset: tiny\n  context_length: 32\n"
        "train:\n  steps: 100\n  batch_size: 8\n  lr: 0.003\n  warmup_steps: 5\n  eval_every: 10\n  progress: false\n"
    )
    result = run("pretrain", "--config", str(config), "--train.steps", "12", "--train.log_every", "3")
    assert result.returncode == 0, result.stderr
    return out / "pt"


def test_pretrain_writes_a_readable_checkpoint_folder(trained):
    files = {p.name for p in (trained / "checkpoint").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"} <= files
    assert (trained / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 12  # the flag overrode the YAML's 100 steps
    assert any("val_loss" in r for r in records) and any("tokens_per_s" in r for r in records)
    assert json.loads((trained / "checkpoint" / "config.json").read_text())["context_length"] == 32


def test_resume_continues_to_more_steps(trained, tmp_path):
    import shutil

    copy = tmp_path / "pt"
    shutil.copytree(trained, copy)
    result = run("pretrain", "--out_dir", str(copy), "--resume", "--train.steps", "15", "--train.progress", "false",
                 "--model.preset", "tiny", "--model.context_length", "32")
    assert result.returncode == 0, result.stderr
    assert json.loads((copy / "checkpoint" / "trainer_state.json").read_text())["step"] == 15


def test_a_second_run_into_the_same_folder_is_refused(trained):
    result = run("pretrain", "--out_dir", str(trained), "--tokenizer.kind", "char")
    assert result.returncode == 2 and "already holds a checkpoint; pass --resume" in result.stderr


def test_generate_from_the_checkpoint(trained):
    result = run("generate", "--model", str(trained / "checkpoint"), "--prompt", "def ", "--max_new_tokens", "12",
                 "--greedy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ")
    assert len(result.stdout) == len("def ") + 12 + 1  # char-level: 12 new tokens are 12 characters, then "\n"
    model, tokenizer = lmforge.load(trained / "checkpoint")
    expected = lmforge.generate_text(model, tokenizer, ["def "], SamplingConfig(max_new_tokens=12, greedy=True))[0]
    assert result.stdout == "def " + expected + "\n"
    two = run("generate", "--model", str(trained / "checkpoint"), "--prompt", "de", "class", "--max_new_tokens", "5",
              "--top_k", "5", "--seed", "1")
    assert two.returncode == 0 and two.stdout.count("-" * 40) == 2


def test_generate_from_a_hugging_face_folder(trained, tmp_path):
    model, tokenizer = lmforge.load(trained / "checkpoint")
    lmforge.save_hf(tmp_path / "hf", model, tokenizer)
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not (tmp_path / "hf" / "trainer_state.json").exists()
    prompts = ["def ", "class G"]
    result = run("generate", "--model", str(tmp_path / "hf"), "--prompt", *prompts, "--max_new_tokens", "10",
                 "--greedy")
    assert result.returncode == 0, result.stderr
    hf_model, hf_tokenizer = lmforge.load(tmp_path / "hf")
    greedy = SamplingConfig(max_new_tokens=10, greedy=True)
    expected = lmforge.generate_text(hf_model, hf_tokenizer, prompts, greedy)
    assert result.stdout == "".join(f"{p}{t}\n{'-' * 40}\n" for p, t in zip(prompts, expected, strict=True))
    assert expected == lmforge.generate_text(model, tokenizer, prompts, greedy)  # the same weights as the checkpoint


def test_tokenizer_train_command(corpus, tmp_path):
    result = run("tokenizer", "train", "--data.sources", str(corpus), "--tokenizer.vocab_size", "300",
                 "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    assert "300 tokens" in result.stdout
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and (tmp_path / "tok" / "tokenizer_config.json").is_file()


def test_help_documents_every_option():
    result = run("pretrain", "--help")
    assert result.returncode == 0
    for flag in ("--config", "--train.lr", "--model.preset", "--model.n_kv_heads", "--data.sources", "--resume"):
        assert flag in result.stdout


def _error_case(tmp_path, corpus, name):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    out = ["--out_dir", str(tmp_path / "out"), "--tokenizer.kind", "char", "--train.progress", "false"]
    cases = {
        "bad value": (["pretrain", *out, "--data.sources", str(corpus), "--train.lr", "fast"], "train.lr='fast'"),
        "missing file": (["pretrain", *out, "--data.sources", str(tmp_path / "nope.txt")], "does not exist"),
        "empty corpus": (["pretrain", *out, "--data.sources", str(empty)], "empty"),
        "shorter than context": (["pretrain", *out, "--data.sources", str(short), "--model.preset", "tiny"],
                                 "fewer than context_length"),
        "unknown option": (["pretrain", *out, "--train.lrr", "1"], "unrecognized arguments: --train.lrr"),
        "bad architecture": (["pretrain", *out, "--data.sources", str(corpus), "--model.d_model", "90"],
                             "not divisible"),
        "bad yaml": (["pretrain", "--config", str(bad_yaml)], "not valid YAML"),
        "missing config": (["pretrain", "--config", str(tmp_path / "none.yaml")], "does not exist"),
        "no model": (["generate", "--prompt", "hi"], "no model given"),
        "not a checkpoint": (["generate", "--model", str(tmp_path), "--prompt", "hi"], "is not a checkpoint"),
        "unknown preset": (["pretrain", *out, "--data.sources", str(corpus), "--model.preset", "gpt9"],
                           "unknown model preset"),
    }
    return cases[name]


@pytest.mark.parametrize("name", [
    "bad value", "missing file", "empty corpus", "shorter than context", "unknown option", "bad architecture",
    "bad yaml", "missing config", "no model", "not a checkpoint", "unknown preset",
])
def test_user_errors_are_one_line_exit_2_no_traceback(tmp_path, corpus, name):
    args, message = _error_case(tmp_path, corpus, name)
    result = run(*args)
    assert_one_line_error(result.stderr, message, result.returncode)
    assert not (tmp_path / "out" / "checkpoint").exists()  # nothing half-written
