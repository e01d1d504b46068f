"""The encoder and encoder-decoder families through the CLI: pretrain --family, finetune --task
classify, embed, seq2seq generate, resume, and their one-line errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from conftest import assert_one_line_error
from conftest import run_cli as run
from lmforge import SamplingConfig
from lmforge.evaluate import perplexity
from lmforge.models import embed_texts

SENTENCES = [
    "a stirring , funny and finally transporting film", "an utterly dull and lifeless mess",
    "the best movie of the year , warm and wise", "a tedious , boring waste of time",
    "smart , sharp and very funny", "clumsy writing and flat acting ruin it",
] * 60


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sst")
    lines = [f"{i % 2} {s}" for i, s in enumerate(SENTENCES)]  # even lines are positive
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    (folder / "dev.jsonl").write_text("".join(json.dumps({"text": s, "label": str(i % 2)}) + "\n"
                                              for i, s in enumerate(SENTENCES[:12])))
    (folder / "text.txt").write_text("\n".join(SENTENCES) + "\n")
    return folder


def pretrain(family: str, corpus, out, *extra: str):
    result = run("pretrain", "--family", family, "--out_dir", str(out), "--data.sources", str(corpus),
                 "--tokenizer.vocab_size", "300", "--model.preset", f"tiny-{'bert' if family == 'masked' else 't5'}",
                 "--model.context_length", "32", "--train.steps", "8", "--train.batch_size", "4",
                 "--train.eval_every", "4", "--train.progress", "false", "--data.val_fraction", "0.2", *extra)
    assert result.returncode == 0, result.stderr
    return out / "checkpoint"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, labelled):
    return pretrain("masked", labelled / "text.txt", tmp_path_factory.mktemp("mlm") / "run")


def test_masked_pretraining_writes_an_encoder_with_a_wordpiece_tokenizer(encoder):
    config = json.loads((encoder / "config.json").read_text())
    assert (config["family"], config["head"]) == ("masked", "lm")
    tokenizer = json.loads((encoder / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "WordPiece"
    assert json.loads((encoder / "tokenizer_config.json").read_text())["mask_token"] == "[MASK]"


def test_seq2seq_pretraining_resumes_and_generates(tmp_path, labelled):
    checkpoint = pretrain("seq2seq", labelled / "text.txt", tmp_path / "run")
    assert json.loads((checkpoint / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    resumed = run("pretrain", "--family", "seq2seq", "--out_dir", str(tmp_path / "run"), "--resume",
                  "--train.steps", "10", "--train.batch_size", "4", "--train.progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 10
    result = run("generate", "--model", str(checkpoint), "--prompt", "a funny <extra_id_0> film", "--greedy",
                 "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("a funny <extra_id_0> film\n=> ")
    model, tokenizer = lmforge.load(checkpoint)
    expected = lmforge.generate_text(model, tokenizer, ["a funny <extra_id_0> film"],
                                     SamplingConfig(max_new_tokens=5, greedy=True))[0]
    assert result.stdout == f"a funny <extra_id_0> film\n=> {expected}\n"


def test_finetune_classify_reports_accuracy_and_saves_a_classifier(encoder, labelled, tmp_path):
    result = run("finetune", "--task", "classify", "--model", str(encoder), "--data",
                 str(labelled / "train.txt"), "--eval_file", str(labelled / "dev.jsonl"), "--out_dir",
                 str(tmp_path / "ft"), "--train.steps", "40", "--train.lr", "3e-3", "--train.progress", "false")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert report["accuracy"] == 100.0, result.stdout  # six distinct sentences: memorised
    config = json.loads((tmp_path / "ft" / "checkpoint" / "config.json").read_text())
    assert (config["head"], config["labels"]) == ("sequence", ["0", "1"])


def test_embed_writes_normalised_vectors(encoder, tmp_path):
    out = tmp_path / "vectors.npy"
    result = run("embed", "--model", str(encoder), "--text", "a funny film", "--text", "a dull mess",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    vectors = np.load(out)
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    model, tokenizer = lmforge.load(encoder)
    expected = embed_texts(model, tokenizer, ["a funny film", "a dull mess"]).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # different texts, different vectors


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--family", "diffusion"], "family='diffusion' is not one of"),
    (["pretrain", "--family", "masked", "--model.preset", "tiny"], "is a causal model but --family is masked"),
    (["finetune", "--model", "ENCODER", "--data", "missing.txt"], "does not exist"),
    (["finetune", "--task", "summarise"], "task='summarise' is not one of"),
    (["embed", "--model", "ENCODER", "--text", "x", "--out", "v.csv"], "must end in .npy or .jsonl"),
    (["finetune", "--model", "ENCODER", "--data", "BAD"], "is not '<label> <text>'"),
])
def test_family_mistakes_are_one_line_errors(args, message, encoder, labelled, tmp_path):
    (tmp_path / "bad.txt").write_text("positive\n")
    args = [a.replace("ENCODER", str(encoder)).replace("BAD", str(tmp_path / "bad.txt")) for a in args]
    result = run(*args, "--out_dir", str(tmp_path / "x")) if args[0] != "embed" else run(*args)
    assert_one_line_error(result.stderr, message, result.returncode)
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_on_an_encoder_fills_in_masks(encoder):
    prompt = "a [MASK] film and a [MASK] mess"
    result = run("generate", "--model", str(encoder), "--prompt", prompt, "--top_k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == prompt and lines[1].startswith("  mask 1: ") and lines[1].count(",") >= 2
    model, tokenizer = lmforge.load(encoder)
    ids = tokenizer.encode_for_encoder(prompt, model.token_room)
    positions = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, positions].double(), dim=-1)
    expected = []
    for number, row in enumerate(probs, start=1):
        best = sorted(range(len(row)), key=lambda i: -row[i].item())[:3]
        expected.append(f"  mask {number}: " + ", ".join(f"{tokenizer.decode([i])!r} {row[i].item():.2f}"
                                                          for i in best))
    assert lines[1:] == expected
    missing = run("generate", "--model", str(encoder), "--prompt", "no mask here")
    assert missing.returncode == 2 and "has no [MASK] to fill" in missing.stderr


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_instruct_finetune_learns_completions_only(family, labelled, tmp_path):
    preset = {"causal": "tiny", "seq2seq": "tiny-t5"}[family]
    pre = run("pretrain", "--family", family, "--out_dir", str(tmp_path / "pt"), "--data.sources",
              str(labelled / "text.txt"), "--tokenizer.vocab_size", "300", "--model.preset", preset,
              "--model.context_length", "32", "--train.steps", "2", "--train.progress", "false")
    assert pre.returncode == 0, pre.stderr
    pairs = [{"prompt": f"review: {s}\nsentiment:", "completion": " good" if i % 2 == 0 else " bad"}
             for i, s in enumerate(SENTENCES[:6])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = run("finetune", "--model", str(tmp_path / "pt" / "checkpoint"), "--data", str(tmp_path / "train.jsonl"),
                 "--eval_file", str(tmp_path / "train.jsonl"), "--out_dir", str(tmp_path / "ft"),
                 "--train.steps", "60", "--train.lr", "3e-3", "--train.warmup_steps", "5", "--train.eval_every", "5",
                 "--train.batch_size", "8", "--train.progress", "false")
    assert result.returncode == 0, result.stderr
    losses = [loss for _, loss in json.loads((tmp_path / "ft" / "eval.json").read_text())["val_losses"]]
    assert losses[-1] < min(0.5, losses[0] / 2), losses  # only " good"/" bad" + EOS carry loss: learnable


def test_lora_finetune_resumes_and_its_adapter_equals_the_merged_model(labelled, tmp_path):
    pre = run("pretrain", "--out_dir", str(tmp_path / "pt"), "--data.sources", str(labelled / "text.txt"),
              "--tokenizer.vocab_size", "300", "--model.preset", "tiny-llama", "--model.context_length", "32",
              "--train.steps", "2", "--train.progress", "false")
    assert pre.returncode == 0, pre.stderr
    base = str(tmp_path / "pt" / "checkpoint")
    pairs = [{"prompt": f"review: {s}\nsentiment:", "completion": " good" if i % 2 == 0 else " bad"}
             for i, s in enumerate(SENTENCES[:6])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = ["finetune", "--model", base, "--data", str(tmp_path / "train.jsonl"), "--out_dir", str(tmp_path / "ft"),
              "--method", "lora", "--peft.r", "4", "--peft.targets", "q", "v", "up", "--train.lr", "1e-2",
              "--train.batch_size", "8", "--train.progress", "false", "--forgetting_data", str(labelled / "text.txt"),
              "--train.schedule", "constant", "--train.warmup_steps", "0"]  # so 6 + 4 steps can equal 10
    first = run(*common, "--train.steps", "6")
    assert first.returncode == 0, first.stderr
    assert "method lora: trainable" in first.stdout and "peak memory" in first.stdout
    assert {p.name for p in (tmp_path / "ft" / "checkpoint").iterdir()} >= {"method.json", "method.safetensors"}
    resumed = run(*common, "--train.steps", "10", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert report["steps"] == 10 and set(report["forgetting"]) >= {"perplexity_before", "perplexity_after"}
    base_model, base_tokenizer = lmforge.load(base)
    text = (labelled / "text.txt").read_text()
    expected = perplexity(base_model, base_tokenizer.encode(text)).perplexity
    assert report["forgetting"]["perplexity_before"] == pytest.approx(expected, rel=1e-5)
    assert report["forgetting"]["perplexity_after"] != pytest.approx(expected, rel=1e-3)  # the adapter changed it
    straight = run(*common[:6], str(tmp_path / "straight"), *common[7:], "--train.steps", "10")
    assert straight.returncode == 0, straight.stderr
    resumed_tensors, straight_tensors = (load_file(str(tmp_path / run_dir / "checkpoint" / "method.safetensors"))
                                         for run_dir in ("ft", "straight"))
    assert all(torch.equal(resumed_tensors[k], straight_tensors[k]) for k in straight_tensors)  # exact resume
    prompt = ["--prompt", "review: boring\nsentiment:", "--greedy", "--max_new_tokens", "4"]
    adapted = run("generate", "--model", base, "--adapter", str(tmp_path / "ft" / "checkpoint"), *prompt)
    merged = run("merge", "--model", base, "--adapter", str(tmp_path / "ft" / "checkpoint"), "--out",
                 str(tmp_path / "merged"))
    assert adapted.returncode == 0 and merged.returncode == 0, adapted.stderr + merged.stderr
    assert run("generate", "--model", str(tmp_path / "merged"), *prompt).stdout == adapted.stdout
    as_hf = run("merge", "--model", base, "--adapter", str(tmp_path / "ft" / "checkpoint"), "--out",
                str(tmp_path / "merged-hf"), "--format", "hf")
    assert as_hf.returncode == 0 and (tmp_path / "merged-hf" / "model.safetensors").is_file(), as_hf.stderr
    assert run("generate", "--model", str(tmp_path / "merged-hf"), *prompt).stdout == adapted.stdout
    wrong = run(*common, "--peft.bottleneck", "4", "--overwrite", "true", "--train.steps", "1")
    assert wrong.returncode == 2 and "--peft.bottleneck does not apply to method 'lora'" in wrong.stderr
