"""Reward models: Bradley-Terry training on a synthetic preference, causal and encoder backbones, save/load,
padding invariance, scoring through the Python API."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.reward import (
    PairBatches,
    bradley_terry_loss,
    is_reward_model,
    reward_fn_from_checkpoint,
    reward_model_from,
    rewards,
    score,
)
from lmforge.checkpoint import load as checkpoint_load
from lmforge.config import ModelConfig
from lmforge.data.batches import pad_batch
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import CausalClassifier, SequenceClassifier, build_model
from lmforge.recipes.align_reward import PreferenceDataConfig, RewardConfig, ScoreConfig, run_reward, run_score
from lmforge.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "red", "blue", "big", "small"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))


def synthetic_pairs(path, n: int, seed: int = 0) -> None:
    """Chosen answers contain the planted word 'please' somewhere; rejected ones never do."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = _sentence(rng).split()
            words.insert(rng.randint(0, len(words)), "please")
            f.write(json.dumps({"prompt": "Q: " + _sentence(rng) + "\nA:", "chosen": " " + " ".join(words),
                                "rejected": " " + _sentence(rng)}) + "\n")


def _config(tmp_path, preset: str, **train) -> RewardConfig:
    data = tmp_path / "pairs.jsonl"
    synthetic_pairs(data, 240)
    return RewardConfig(preset=preset, vocab_size=300, max_length=48, out_dir=str(tmp_path / "rm"),
                        prefs=PreferenceDataConfig(data=str(data), eval_fraction=0.25),
                        train=TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=0,
                                          eval_batches=2, log_every=10, progress=False, **train))


@pytest.mark.parametrize("preset", ["tiny", "tiny-bert"])
def test_reward_model_learns_a_planted_preference(tmp_path, preset):
    result = run_reward(_config(tmp_path, preset))
    report = json.loads((tmp_path / "rm" / "reward_report.json").read_text())
    assert report["held_out_pairs"] == 60
    assert report["held_out"]["accuracy"] > 0.9, report
    assert report["held_out"]["margin"] > report["before"]["margin"]
    expected = CausalClassifier if preset == "tiny" else SequenceClassifier
    assert isinstance(result.model, expected) and is_reward_model(result.model)
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in metrics[-2] and "margin" in metrics[-2]
    # save -> load -> the same scores, through both loaders and the callable adapter
    folder = tmp_path / "rm" / "checkpoint"
    loaded, tokenizer = load(folder)
    assert type(loaded) is expected and loaded.cfg.head == "sequence" and loaded.cfg.num_labels == 1
    prompts, completions = ["Q: the cat\nA:"] * 2, [" the dog please sat", " the dog sat"]
    original = score(result.model, result.tokenizer, prompts, completions)
    assert score(loaded, tokenizer, prompts, completions) == original
    assert reward_fn_from_checkpoint(folder)(prompts, completions) == original
    assert score(*checkpoint_load(folder), prompts, completions) == original
    assert original[0] > original[1]


def test_bradley_terry_loss_is_the_hand_formula():
    torch.manual_seed(0)
    model = reward_model_from(build_model(ModelConfig.from_preset("tiny")))
    ids, mask = pad_batch([[5, 6, 7], [8, 9], [5, 6], [10, 11, 12, 13]], 0, side="right")
    loss, metrics = bradley_terry_loss(model, {"input_ids": ids, "attention_mask": mask})
    r = rewards(model, ids, mask)
    margin = r[:2] - r[2:]
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-margin)).mean())
    torch.testing.assert_close(metrics["margin"], margin.mean())
    assert metrics["accuracy"] == (margin > 0).float().mean()
    assert float(F.logsigmoid(torch.tensor(0.0))) == pytest.approx(-0.6931, abs=1e-4)


def test_last_token_pooling_is_padding_invariant():
    torch.manual_seed(0)
    model = reward_model_from(build_model(ModelConfig.from_preset("tiny-llama"))).eval()
    rows = [[5, 6, 7, 8, 9], [3, 4], [10]]
    alone = torch.stack([rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    for side in ("left", "right"):
        ids, mask = pad_batch(rows, 0, side=side)
        torch.testing.assert_close(rewards(model, ids, mask), alone, atol=1e-5, rtol=1e-5)


def test_backbone_weights_carry_over_and_the_head_is_new():
    torch.manual_seed(0)
    base = build_model(ModelConfig.from_preset("tiny"))
    model = reward_model_from(base)
    assert torch.equal(model.decoder.blocks[0].attn.qkv.weight, base.decoder.blocks[0].attn.qkv.weight)
    assert torch.equal(model.embed.weight, base.embed.weight)
    assert not hasattr(model, "lm_head") and model.classifier.weight.shape == (1, 64)
    assert reward_model_from(model) is model
    with pytest.raises(UserError, match="causal transformer or an encoder"):
        reward_model_from(build_model(ModelConfig.from_preset("tiny-t5")))


def test_pair_batches_are_a_pure_function_of_the_index():
    batches = PairBatches([[1, 2], [3], [4, 5, 6]], [[7], [8, 9], [10]], batch_size=2, pad_id=0, seed=3)
    assert torch.equal(batches(5)["input_ids"], batches(5)["input_ids"])
    first = batches.in_order()[0]
    assert first["input_ids"].tolist() == [[1, 2], [3, 0], [7, 0], [8, 9]]  # chosen rows, then their rejected


def test_score_cli_function_and_errors(tmp_path, capsys):
    cfg = _config(tmp_path, "tiny")
    cfg.train.steps = 2
    run_reward(cfg)
    capsys.readouterr()
    folder = str(tmp_path / "rm" / "checkpoint")
    scores = run_score(ScoreConfig(model=folder, prompt="Q: a\nA:", completion=[" please sat", " sat"]))
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(scores, abs=1e-4)
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "Q: a\nA:", "completion": " sat"}) + "\n")
    assert run_score(ScoreConfig(model=folder, data=str(data))) == pytest.approx(scores[1:], abs=1e-5)
    with pytest.raises(UserError, match="not a reward model"):
        reward_fn_from_checkpoint(_plain_lm(tmp_path))
    with pytest.raises(UserError, match="exactly one of --model"):
        RewardConfig()
    with pytest.raises(UserError, match="2 prompts but 1 completions"):
        score(*load(folder), ["a", "b"], ["c"])


def _plain_lm(tmp_path):
    from lmforge.checkpoint import save
    from lmforge.tokenizer import train_char
    folder = tmp_path / "lm"
    save(folder, build_model(ModelConfig.from_preset("tiny")), train_char(["abc"]))
    return folder


def test_cli_align_score_prints_the_api_scores(tmp_path):
    from conftest import run_cli
    cfg = _config(tmp_path, "tiny")
    cfg.train.steps = 2
    result = run_reward(cfg)
    folder = tmp_path / "rm" / "checkpoint"
    done = run_cli("align", "score", "--model", str(folder), "--prompt", "Q: a\nA:", "--completion", " please sat",
                   " sat")
    assert done.returncode == 0, done.stderr
    printed = [float(line.split("\t")[0]) for line in done.stdout.splitlines()]
    expected = score(result.model, result.tokenizer, ["Q: a\nA:"] * 2, [" please sat", " sat"])
    assert printed == pytest.approx(expected, abs=1e-4)
