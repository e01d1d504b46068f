"""Exact resume for every fine-tuning method and for masked and seq2seq pre-training (issue 17).

Each case runs a recipe (`finetune` / `pretrain`, the Python API) for a few steps without a break, then again
stopped after step K (an `on_step` hook that returns True, which checkpoints like Ctrl-C does) and resumed with
`resume=True` from a fresh process state: the resumed run must end bit for bit where the uninterrupted one did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXT, make_model
from lmforge.checkpoint import model_tensors
from lmforge.recipes.finetune import FinetuneConfig, MethodOptions, finetune
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.tokenizer import DEFAULT_SPECIALS, train_char, train_unigram, train_wordpiece
from lmforge.train import TrainConfig
from lmforge.train import train as real_train
from lmforge.train.checkpoint import read_trainer_state, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, STOP_AT = 4, 2

METHODS = {
    "full": {},
    "lora": dict(r=2, targets=["q", "v", "down"], dropout=0.1),  # dropout: the RNG state must resume too
    "qlora": dict(r=2, block_size=32),
    "prompt": dict(n_tokens=3),
    "prefix": dict(n_tokens=3, hidden=8),
    "adapter": dict(bottleneck=4),
    "bitfit": {},
    "selective": dict(patterns=["decoder.blocks.1"]),
}


def _stopping_after(step_k: int):
    """The recipes' `train`, stopped after optimizer step `step_k` by the loop's own on_step hook."""

    def train(*args, **kwargs):
        assert "on_step" not in kwargs
        return real_train(*args, on_step=lambda step, model, optimizer: step == step_k, **kwargs)

    return train


def _equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    """A tiny GPT-2-shaped checkpoint (biases, for BitFit) with a char tokenizer, and prompt/completion data."""
    folder = tmp_path_factory.mktemp("resume_base")
    tokenizer = train_char([SAMPLE_TEXT], specials=DEFAULT_SPECIALS)
    model = make_model("tiny", vocab_size=tokenizer.vocab_size, context_length=48)
    save_checkpoint(folder / "base", model, tokenizer)
    words = SAMPLE_TEXT.split()
    records = [{"prompt": " ".join(words[i:i + 3]) + " ->", "completion": " " + " ".join(words[i + 3:i + 5])}
               for i in range(0, 120, 4)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "base", folder / "train.jsonl"


def _finetune_config(base: Path, data: Path, out: Path, method: str, resume: bool = False) -> FinetuneConfig:
    return FinetuneConfig(
        model=str(base), data=[str(data)], method=method, peft=MethodOptions(**METHODS[method]), out_dir=str(out),
        max_length=32, resume=resume,
        train=TrainConfig(steps=STEPS, batch_size=4, lr=3e-2, warmup_steps=1, weight_decay=0.1, eval_every=0,
                          log_every=1, progress=False, device="cpu"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_interrupted_then_resumed_finetune_equals_an_uninterrupted_one(base_and_data, tmp_path, monkeypatch,
                                                                         method):
    base, data = base_and_data
    whole = finetune(_finetune_config(base, data, tmp_path / "whole", method))
    recipe = sys.modules["lmforge.recipes.finetune"]
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "train", _stopping_after(STOP_AT))
        cut = finetune(_finetune_config(base, data, tmp_path / "cut", method))
    state, _ = read_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["step"] == STOP_AT
    stopped = model_tensors(cut.model)
    torch.manual_seed(1234)  # a different global RNG state: the checkpoint must bring the run's own back
    resumed = finetune(_finetune_config(base, data, tmp_path / "cut", method, resume=True))
    final = model_tensors(whole.model)
    assert not _equal_tensors(stopped, final)  # the interrupted run had work left to do
    assert _equal_tensors(model_tensors(resumed.model), final)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    assert [s for s, _ in _losses(tmp_path / "whole")] == list(range(1, STEPS + 1))


PRETRAIN_FAMILIES = {
    "masked": (dict(preset="small-bert", d_model=32, n_layers=2, n_heads=2, d_ff=64, context_length=32),
               lambda docs: train_wordpiece(docs, 200)),
    "seq2seq": (dict(preset="small-t5", d_model=32, n_layers=2, n_heads=2, d_ff=64, context_length=32),
                lambda docs: train_unigram(docs, 200, 8)),
}


def _pretrain_config(corpus: Path, tokenizer: Path, out: Path, family: str, resume: bool = False) -> PretrainConfig:
    return PretrainConfig(
        out_dir=str(out), family=family, data=DataConfig(sources=[str(corpus)], val_fraction=0.1),
        tokenizer=TokenizerConfig(path=str(tokenizer)), model=dict(PRETRAIN_FAMILIES[family][0]), resume=resume,
        train=TrainConfig(steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, eval_batches=2,
                          log_every=1, progress=False, device="cpu"))


@pytest.mark.parametrize("family", sorted(PRETRAIN_FAMILIES))
def test_an_interrupted_then_resumed_pretraining_equals_an_uninterrupted_one(tmp_path, monkeypatch, family):
    corpus = tmp_path / "corpus.py"
    corpus.write_text(SAMPLE_TEXT)
    # One tokenizer for all three runs: WordPiece and Unigram training is not reproducible from run to run
    # (tied vocabulary entries come out in a different order), which would change the data, not test resume.
    PRETRAIN_FAMILIES[family][1]([SAMPLE_TEXT]).save(tmp_path / "tokenizer")
    tokenizer = tmp_path / "tokenizer"
    whole = pretrain(_pretrain_config(corpus, tokenizer, tmp_path / "whole", family))
    recipe = sys.modules["lmforge.recipes.pretrain"]
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "train", _stopping_after(STOP_AT))
        cut = pretrain(_pretrain_config(corpus, tokenizer, tmp_path / "cut", family))
    assert read_trainer_state(tmp_path / "cut" / "checkpoint")[0]["step"] == STOP_AT
    stopped = model_tensors(cut.model)
    torch.manual_seed(1234)
    resumed = pretrain(_pretrain_config(corpus, tokenizer, tmp_path / "cut", family, resume=True))
    final = model_tensors(whole.model)
    assert not _equal_tensors(stopped, final)
    assert _equal_tensors(model_tensors(resumed.model), final)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    assert resumed.result.step == STEPS
