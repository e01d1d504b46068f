"""Recurrent LMs (--model.arch rnn|lstm|gru): they learn, their hidden-state cache is exact, and pretrain,
generate and evaluate take them unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmforge
from conftest import SAMPLE_TEXT, assert_one_line_error, perturb, run_cli
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import CausalLM, RecurrentLM, build_model
from lmforge.models.base import IGNORE_INDEX
from lmforge.models.recurrent import recurrent_parameters
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.train import TrainConfig

ARCHS = ("rnn", "lstm", "gru")


def recurrent(arch: str, seed: int = 0, **overrides) -> RecurrentLM:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", arch=arch, **overrides))
    assert isinstance(model, RecurrentLM) and isinstance(model, CausalLM)
    return model


def delayed_copy_batch(generator: torch.Generator, delay: int, batch: int = 32, length: int = 20,
                       symbols: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random symbols; the label at t is the input at t - delay (nothing to predict before that)."""
    ids = torch.randint(0, symbols, (batch, length), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, delay:] = ids[:, :-delay]
    return ids, labels


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_to_copy_with_a_delay(arch, one_thread):
    """Recalling the symbol seen 3 steps ago needs memory: chance is ln 8 = 2.08 nats; each arch gets below 0.1."""
    model = recurrent(arch, d_model=48, n_layers=1, vocab_size=8).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        ids, labels = delayed_copy_batch(generator, delay=3)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids, labels = delayed_copy_batch(torch.Generator().manual_seed(1), delay=3, batch=256)
    with torch.no_grad():
        assert model.eval()(ids, labels=labels).loss.item() < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_steps_equal_full_recompute(arch):
    model = recurrent(arch, n_layers=2, tie_embeddings=False).eval()
    perturb(model, 0.05, seed=0)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache, last_only=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_does_not_touch_the_state(arch):
    """A short prompt batched (left-padded) with a long one generates what it generates alone, token for token."""
    model = recurrent(arch).eval()
    perturb(model, 0.1, seed=1)
    short, long = [5, 9, 2], [7, 1, 4, 4, 8, 3, 6]
    cfg = SamplingConfig(max_new_tokens=8, greedy=True)
    together = generate(model, [short, long], cfg, pad_id=0)
    assert together == [generate(model, [short], cfg)[0], generate(model, [long], cfg)[0]]
    with torch.no_grad():  # the cached greedy path equals argmax over a full forward each step
        tokens = list(short)
        for _ in range(8):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert together[0] == tokens[len(short):]


def test_parameter_count_formula_matches_the_model():
    for arch in ARCHS:
        for tie in (True, False):
            cfg = ModelConfig.from_preset("tiny", arch=arch, n_layers=3, d_model=40, tie_embeddings=tie)
            assert recurrent_parameters(cfg) == build_model(cfg).num_parameters()


def test_pretrain_generate_evaluate_an_lstm(tmp_path, one_thread):
    """pretrain in-process (one thread: a busy CPU makes torch's thread pool spin), generate and evaluate through
    the CLI as a user would."""
    corpus = tmp_path / "code.py"
    corpus.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    pretrain(PretrainConfig(out_dir=str(out), data=DataConfig(sources=[str(corpus)]), tokenizer=TokenizerConfig(
        kind="char"), model=dict(preset="tiny", arch="lstm", context_length=32), train=TrainConfig(
        steps=40, batch_size=8, lr=0.01, warmup_steps=2, progress=False)))
    checkpoint = out / "checkpoint"
    assert json.loads((checkpoint / "config.json").read_text())["arch"] == "lstm"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    model, _ = lmforge.load(checkpoint)
    # 40 steps on repeated code: well below the uniform guess over its characters
    assert losses[-1] < math.log(model.cfg.vocab_size) - 0.8
    assert isinstance(model, RecurrentLM) and model.cfg.arch == "lstm"
    result = run_cli("generate", "--model", str(checkpoint), "--prompt", "def ", "--max_new_tokens", "10", "--greedy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and len(result.stdout) == len("def ") + 10 + 1
    report = tmp_path / "eval.json"
    result = run_cli("evaluate", "--model", str(checkpoint), "--task", "perplexity", "--data", str(corpus),
                     "--limit", "2000", "--out", str(report))
    assert result.returncode == 0, result.stderr
    assert 1.0 < json.loads(report.read_text())["tasks"]["perplexity:code.py"]["results"]["0"]["score"] < 20.0
    result = run_cli("convert", "--from", "lmforge", "--to", "hf", str(checkpoint), str(tmp_path / "hf"))
    assert_one_line_error(result.stderr, "has no Hugging Face transformers equivalent", result.returncode)
    assert not (tmp_path / "hf").exists()


def test_flops_count_the_recurrent_matmuls_and_no_attention():
    from lmforge.estimate import flops_per_token, matmul_parameters
    cfg = ModelConfig.from_preset("tiny", arch="lstm", n_layers=2, d_model=40, vocab_size=100)
    assert matmul_parameters(cfg) == 2 * 4 * 2 * 40 * 40 + 40 * 100  # input and state matrices per gate, the head
    assert flops_per_token(cfg, seq_len=512) == 6 * matmul_parameters(cfg)  # no context term, however long


@pytest.mark.parametrize("overrides, message", [
    (dict(arch="transformerxl"), "model.arch='transformerxl' is not supported; choose one of: transformer, rnn"),
    (dict(arch="lstm", n_kv_heads=2), "model.n_kv_heads is an attention option, which model.arch='lstm' does not"),
    (dict(arch="gru", family="masked"), "model.arch='gru' is a causal language model; set model.family='causal'"),
    (dict(arch="rnn", head="sequence", num_labels=2), "model.head='sequence' needs model.family='masked'"),
])
def test_bad_recurrent_configs(overrides, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_preset("tiny", **overrides)


def test_unknown_arch_from_the_cli(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 20)
    result = run_cli("pretrain", "--data.sources", str(corpus), "--model.arch", "cnn", "--out_dir", str(tmp_path / "o"))
    assert_one_line_error(result.stderr, "model.arch='cnn' is not supported", result.returncode)
