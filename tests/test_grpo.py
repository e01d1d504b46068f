"""GRPO (lmforge.align.grpo): group-relative advantages, the k3 KL term in the loss, a tiny policy that learns."""

from __future__ import annotations

import json

import pytest
import torch
from test_ppo import PROMPTS, char_tokenizer, quiet_train, tiny_policy

from lmforge.align.grpo import GroupBatches, GrpoSettings, group_advantages, grpo, grpo_loss
from lmforge.align.ppo import Reference
from lmforge.align.rollout import char_fraction
from lmforge.errors import UserError
from lmforge.recipes.align_rl import GrpoConfig, run_grpo
from lmforge.train import save_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are overhead-bound: one thread is fastest."""


def test_group_advantages_equal_a_hand_computation():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # Bessel-corrected, as DeepSeekMath and trl
    expected = torch.tensor([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4),
                             0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(scores, 4), expected)


def test_a_rollout_holds_g_samples_per_prompt_and_starts_with_zero_kl():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    settings = GrpoSettings(rollout_batch=8, group_size=4, minibatches=1, ppo_epochs=1, max_new_tokens=5, beta=0.3)
    batches = GroupBatches(policy, tokenizer, PROMPTS, char_fraction("a"), settings, Reference(policy))
    prompts = batches.rollout_prompts(0)
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    batch = batches(0)
    assert torch.equal(batch["old_logp"], batch["ref_logp"]) and batch["stats"]["kl"] == 0.0
    assert "values" not in batch
    _, metrics = grpo_loss(settings)(policy, batch)
    assert metrics["kl_loss"] == 0.0 and metrics["clip_frac"] == 0.0
    buffer = batches.buffer  # rollout order (a minibatch is shuffled): groups are consecutive rows
    per_row = buffer["advantages"].sum(1) / buffer["mask"].sum(1)
    assert torch.allclose(per_row.view(-1, 4).sum(1), torch.zeros(2), atol=1e-4)  # relative to the group


@pytest.mark.parametrize(("options", "message"), [
    ({"group_size": 1}, "group_size=1 must be >= 2"),
    ({"group_size": 3, "rollout_batch": 8}, "group_size=3 must divide rollout_batch=8"),
    ({"beta": -1.0}, "beta=-1.0"),
])
def test_bad_group_settings_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        GrpoSettings(**options)


def test_grpo_raises_the_reward_of_a_tiny_policy_while_the_kl_stays_bounded(tmp_path):
    tokenizer = char_tokenizer()
    settings = GrpoSettings(rollout_batch=16, group_size=4, minibatches=2, ppo_epochs=2, max_new_tokens=8, beta=0.02)
    result = grpo(tiny_policy(tokenizer), tokenizer, PROMPTS, char_fraction("a"), settings,
                  quiet_train(32, lr=5e-3), out_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("score", "kl", "kl_loss", "beta", "entropy", "clip_frac", "policy_loss", "completion_length"):
        assert name in lines[-1]
    first, last = lines[0]["score"], (lines[-1]["score"] + lines[-2]["score"]) / 2
    assert first < 0.15 and last > 0.5, (first, last)  # seeds 0-2 reach 0.72-0.86 (first 0.04-0.09)
    assert max(line["kl"] for line in lines) < 20.0  # summed over 8 tokens; seeds 0-2 peak at 6-13
    assert result.rollouts == 8


def test_the_grpo_recipe_runs_from_files(tmp_path):
    tokenizer = char_tokenizer()
    save_checkpoint(tmp_path / "policy", tiny_policy(tokenizer), tokenizer)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ab"}\n{"prompt": "x"}\n')
    cfg = GrpoConfig(model=str(tmp_path / "policy"), prompts=str(tmp_path / "prompts.jsonl"), reward="fraction:a",
                     rollout_batch=4, group_size=2, minibatches=1, ppo_epochs=1, max_new_tokens=4,
                     out_dir=str(tmp_path / "run"), train=quiet_train(2))
    result = run_grpo(cfg)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    assert result.steps == 2 and len(result.samples) == 4
