"""PPO with a KL penalty (lmforge.align.ppo, kl, rollout): the pitfalls of public RLHF code pinned one by one,
a tiny policy that learns a programmatic reward, exact resume, the recipe and its one-line errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import assert_one_line_error, make_model, run_cli
from lmforge.align.kl import AdaptiveKL, FixedKL, kl_controller, kl_per_token
from lmforge.align.logprobs import completion_logprobs
from lmforge.align.ppo import (
    PolicyWithValue,
    PpoSettings,
    Reference,
    RolloutBatches,
    gae,
    policy_outputs,
    ppo,
    token_rewards,
    whiten,
)
from lmforge.align.rollout import char_fraction, compiles, cut_at_eos, resolve_reward, sample_rollout, score
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.interop import load
from lmforge.peft import apply_method
from lmforge.recipes.align_rl import PpoConfig, read_prompts, run_ppo
from lmforge.tokenizer import train_char
from lmforge.train import TrainConfig, save_checkpoint

PROMPTS = ["ab", "cd", "x", "hgf"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are overhead-bound: one thread is fastest."""


def char_tokenizer(pad_is_eos: bool = False):
    specials = {"eos": "<eos>", "pad": "<eos>"} if pad_is_eos else {"eos": "<eos>", "pad": "<pad>"}
    return train_char(["abcdefgh xyz\n"], specials=specials)


def tiny_policy(tokenizer, seed: int = 0, **overrides):
    return make_model("tiny", seed=seed, vocab_size=tokenizer.vocab_size, **overrides)


def quiet_train(steps: int, lr: float = 3e-3) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, progress=False,
                       log_every=4, eval_every=0, save_every_minutes=0)


def rollout_batches(policy, tokenizer, reference=None, **settings) -> RolloutBatches:
    options = {"rollout_batch": 8, "minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 6, **settings}
    return RolloutBatches(PolicyWithValue(policy), tokenizer, PROMPTS, char_fraction("a"), PpoSettings(**options),
                          Reference(policy, reference))


# -- KL ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_is_exactly_zero_when_the_policy_is_the_reference(estimator):
    tokenizer = char_tokenizer()
    batches = rollout_batches(tiny_policy(tokenizer), tokenizer, kl_estimator=estimator, beta=0.5)
    batch = batches(0)
    assert batch["mask"].sum() > 0
    assert torch.equal(kl_per_token(batch["old_logp"], batch["ref_logp"], estimator),
                       torch.zeros_like(batch["old_logp"]))
    assert batch["stats"]["kl"] == 0.0


def test_a_lora_policy_uses_its_base_as_reference_without_a_copy():
    tokenizer = char_tokenizer()
    base = tiny_policy(tokenizer)
    policy = apply_method(copy.deepcopy(base), "lora", targets=["q", "v"], r=2)
    reference = Reference(policy)
    assert reference.shared and reference.model is None
    with torch.no_grad():
        for update in (u for m in policy.modules() if hasattr(m, "lora") for u in m.lora.values()):
            update.B.normal_()  # a trained adapter
    rollout = sample_rollout(policy, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=5, seed=1))
    args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
    assert torch.equal(reference.logprobs(*args), completion_logprobs(base, *args))
    assert not torch.allclose(completion_logprobs(policy, *args), completion_logprobs(base, *args))
    bitfit = apply_method(copy.deepcopy(base), "bitfit")  # trains base weights: the reference must be a copy
    assert not Reference(bitfit).shared and Reference(bitfit).model is not None


def test_k3_is_never_negative_and_matches_its_definition():
    logp = torch.randn(1000, dtype=torch.float64) * 3
    ref = torch.randn(1000, dtype=torch.float64) * 3
    k3 = kl_per_token(logp, ref, "k3")
    r = torch.exp(ref - logp)
    assert (k3 >= 0).all()
    assert torch.allclose(k3, (r - 1) - torch.log(r))
    assert torch.equal(kl_per_token(logp, ref, "k1"), logp - ref)


def test_adaptive_beta_follows_zieglers_rule_and_round_trips():
    controller = kl_controller(0.1, target=6.0, horizon=100)
    assert isinstance(controller, AdaptiveKL)
    controller.update(kl=9.0, n_samples=10)  # error 0.5 is clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=5.4, n_samples=10)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    restored = AdaptiveKL(1.0, target=6.0, horizon=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    fixed = FixedKL(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


# -- advantages and values ------------------------------------------------------------------------------------


def test_gae_equals_a_hand_computation():
    gamma, lam = 0.9, 0.8
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[7.0, 0.5, 1.0, -0.5]])  # the prompt column's value must not leak in
    rewards = torch.tensor([[3.0, 0.1, -0.2, 1.0]])
    d3 = 1.0 - (-0.5)
    d2 = -0.2 + gamma * -0.5 - 1.0
    d1 = 0.1 + gamma * 1.0 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[0.0, a1, a2, a3]]))
    assert torch.allclose(returns, torch.tensor([[0.0, a1 + 0.5, a2 + 1.0, a3 - 0.5]]))


def test_token_rewards_put_the_score_on_the_last_completion_token_and_the_penalty_on_all():
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[9.0, 0.5, 1.0], [1.0, 2.0, 3.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, -0.1 + 2.0], [-0.1, -0.2, -0.3 - 1.0]]))


def test_whitening_uses_completion_tokens_only():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    out = whiten(torch.tensor([[100.0, 1.0, 2.0, 3.0]]), mask)
    assert out[0, 0] == 0
    assert torch.allclose(out[0, 1:], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3), atol=1e-6)


def test_the_value_head_starts_at_zero():
    tokenizer = char_tokenizer()
    batches = rollout_batches(tiny_policy(tokenizer), tokenizer)
    head = batches.model.value_head.linear
    assert torch.equal(head.weight, torch.zeros_like(head.weight)) and head.bias.item() == 0
    assert torch.equal(batches(0)["values"], torch.zeros_like(batches(0)["values"]))


def test_returns_carry_the_score_minus_the_penalty_for_a_completion_that_never_ends():
    tokenizer = char_tokenizer()
    batches = rollout_batches(tiny_policy(tokenizer), tokenizer, beta=0.0, gamma=1.0, lam=1.0, whiten=False,
                              missing_eos_penalty=0.75, max_new_tokens=3, minibatches=1)
    batches(0)
    buffer = batches.buffer
    first = buffer["mask"].argmax(dim=1)
    rows = torch.arange(len(first))
    texts = [batches.samples[i]["completion"] for i in range(len(first))]
    scores = torch.tensor(char_fraction("a")([""] * len(texts), texts))
    ended = buffer["input_ids"][:, -1] == tokenizer.eos_id
    assert not ended.all()
    # values start at 0 and gamma = lambda = 1: the first token's return is the whole (penalised) score
    assert torch.allclose(buffer["returns"][rows, first], scores - 0.75 * (~ended).float())


# -- rollouts ----------------------------------------------------------------------------------------------------


def test_scoring_has_dropout_off_and_leaves_the_training_mode_alone():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer, dropout=0.5)
    batches = rollout_batches(policy, tokenizer)
    batches.model.train()
    batch = batches(0)
    assert batches.model.training and policy.training
    eval_copy = copy.deepcopy(policy).eval()
    rows = slice(None)
    expected = completion_logprobs(eval_copy, batches.buffer["input_ids"], batches.buffer["attention_mask"],
                                   torch.nn.functional.pad(batches.buffer["mask"], (1, 0)).long())
    assert torch.allclose(batches.buffer["old_logp"][rows], expected, atol=1e-6)
    logp, _, _ = policy_outputs(batches.model.eval(), batch, with_values=True)
    assert torch.allclose(logp, batch["old_logp"], atol=1e-6)  # the first update's ratio is exactly 1


def test_left_padded_rollouts_score_like_unpadded_rows_and_only_completion_tokens():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    rollout = sample_rollout(policy, tokenizer, ["a", "hgfedcb", "xy"], SamplingConfig(max_new_tokens=6, seed=3))
    assert (rollout.attention_mask[:, 0] == 0).any()  # some rows are left-padded
    batched = completion_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
    for row in range(3):
        real = rollout.attention_mask[row].bool()
        ids, completion = rollout.input_ids[row, real][None], rollout.completion_mask[row, real][None]
        alone = completion_logprobs(policy, ids, torch.ones_like(ids), completion)
        width = alone.shape[1]
        assert torch.allclose(batched[row, -width:], alone[0], atol=1e-5)
        assert (batched[row, :-width] == 0).all()
        assert (alone[0][completion[0, 1:] == 0] == 0).all() and (alone[0][completion[0, 1:] == 1] < 0).all()


def test_a_completion_keeps_its_eos_when_pad_is_eos():
    tokenizer = char_tokenizer(pad_is_eos=True)
    assert tokenizer.pad_id == tokenizer.eos_id
    assert cut_at_eos([4, 5, tokenizer.eos_id, 6], tokenizer.eos_id) == ([4, 5, tokenizer.eos_id], True)
    assert cut_at_eos([4, 5], tokenizer.eos_id) == ([4, 5], False)
    rollout = sample_rollout(tiny_policy(tokenizer), tokenizer, PROMPTS * 8, SamplingConfig(max_new_tokens=8, seed=0))
    assert rollout.ended.any() and not rollout.ended.all()
    for row in range(len(rollout.prompts)):
        last = rollout.input_ids[row, -1].item()
        assert rollout.completion_mask[row, -1] == 1  # left padding: every completion ends the row
        assert (last == tokenizer.eos_id) == bool(rollout.ended[row])
    assert "<eos>" not in "".join(rollout.completions)


# -- rewards -------------------------------------------------------------------------------------------------------


def test_built_in_rewards():
    assert compiles(["def f(x):\n", "def g(:\n"], ["    return x\n", "    pass\n"]) == [1.0, 0.0]
    assert resolve_reward("compiles") is compiles
    assert resolve_reward("fraction:ab")(["p", "p", "p"], ["aab", "xyz", ""]) == [1.0, 0.0, 0.0]
    assert resolve_reward("math:fsum") is math.fsum  # module:function


@pytest.mark.parametrize(("reward", "message"), [
    (lambda p, c: [1.0] * (len(c) - 1), "returned 3 scores for 4 completions"),
    (lambda p, c: [float("nan")] * len(c), "1 non-finite|4 non-finite"),
    (lambda p, c: None, "list of numbers"),
])
def test_a_bad_reward_function_is_a_one_line_error(reward, message):
    with pytest.raises(UserError, match=message) as err:
        score(reward, PROMPTS, ["a", "b", "c", "d"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"beta": -0.1}, "beta=-0.1 must be a number >= 0"),
    ({"kl_estimator": "k2"}, "kl estimator 'k2'"),
    ({"rollout_batch": 6, "minibatches": 4}, "must divide rollout_batch"),
    ({"kl_target": 0.0}, "kl_target=0.0"),
])
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        PpoSettings(**options)


@pytest.mark.parametrize("reward", ["nosuchreward", "no_such_module_xyz:f", "math:no_such_function"])
def test_an_unknown_reward_is_a_one_line_error(reward):
    with pytest.raises(UserError, match="--reward"):
        resolve_reward(reward)


# -- learning, resume, the recipe -----------------------------------------------------------------------------------


def test_ppo_raises_the_reward_of_a_tiny_policy_while_the_kl_stays_bounded(tmp_path):
    tokenizer = char_tokenizer()
    settings = PpoSettings(rollout_batch=16, minibatches=2, ppo_epochs=2, max_new_tokens=8, beta=0.02)
    result = ppo(tiny_policy(tokenizer), tokenizer, PROMPTS, char_fraction("a"), settings,
                 quiet_train(32, lr=5e-3), out_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("score", "kl", "beta", "entropy", "clip_frac", "value_loss", "policy_loss", "completion_length"):
        assert name in lines[-1]
    first, last = lines[0]["score"], (lines[-1]["score"] + lines[-2]["score"]) / 2
    assert first < 0.15 and last > 0.5, (first, last)  # seeds 0-2 reach 0.72-0.86 (first 0.04-0.09)
    assert max(line["kl"] for line in lines) < 20.0  # summed over 8 tokens; seeds 0-2 peak at 6-13
    assert result.rollouts == 8 and result.steps == 32
    reloaded, _ = load(tmp_path / "checkpoint")
    assert torch.equal(reloaded.lm_head.weight, result.policy.lm_head.weight)


def test_resume_mid_rollout_gives_the_same_policy_and_value_head(tmp_path):
    tokenizer = char_tokenizer()
    settings = PpoSettings(rollout_batch=8, minibatches=2, ppo_epochs=2, max_new_tokens=5, kl_target=1.0, beta=0.1)

    def run(out, steps, resume=False):
        policy = tiny_policy(tokenizer)
        return ppo(policy, tokenizer, PROMPTS, char_fraction("a"), settings, quiet_train(steps), out_dir=out,
                   reference=tiny_policy(tokenizer), resume=resume)

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)  # 4 steps per rollout: stops inside the first rollout's second epoch
    resumed = run(tmp_path / "b", 6, resume=True)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight.stats == resumed.stats
    state_a = json.loads((tmp_path / "a" / "checkpoint" / "trainer_state.json").read_text())
    state_b = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state_a["stateful"]["batches"]["controller"] == state_b["stateful"]["batches"]["controller"]


def test_the_recipe_trains_a_lora_policy_from_files(tmp_path):
    tokenizer = char_tokenizer()
    save_checkpoint(tmp_path / "policy", tiny_policy(tokenizer), tokenizer)
    (tmp_path / "prompts.txt").write_text("ab\ncd\n\nx\\ny\n")
    assert read_prompts(str(tmp_path / "prompts.txt")) == ["ab", "cd", "x\ny"]
    cfg = PpoConfig(model=str(tmp_path / "policy"), prompts=str(tmp_path / "prompts.txt"), reward="fraction:a",
                    method="lora", rollout_batch=4, minibatches=2, ppo_epochs=1, max_new_tokens=4,
                    out_dir=str(tmp_path / "run"), train=quiet_train(4), show_samples=2)
    result = run_ppo(cfg)
    assert (tmp_path / "run" / "checkpoint" / "method.json").is_file()
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert len(samples) == 4 and {"prompt", "completion", "score"} <= set(samples[0])
    assert result.steps == 4
    with pytest.raises(UserError, match="exactly one of --reward"):
        run_ppo(PpoConfig(model=cfg.model, prompts=cfg.prompts, out_dir=str(tmp_path / "r2")))
    with pytest.raises(UserError, match="already holds a checkpoint"):
        run_ppo(cfg)


def test_lmforge_align_ppo_and_grpo_from_the_command_line(tmp_path):
    tokenizer = char_tokenizer()
    save_checkpoint(tmp_path / "policy", tiny_policy(tokenizer), tokenizer)
    (tmp_path / "prompts.txt").write_text("ab\ncd\n")
    common = ["--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.txt"),
              "--rollout_batch", "4", "--minibatches", "2", "--ppo_epochs", "1", "--max_new_tokens", "4",
              "--train.progress", "false"]
    done = run_cli("align", "ppo", *common, "--reward", "fraction:a", "--kl_estimator", "k3", "--kl_target", "2",
                   "--train.steps", "2", "--out_dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "ppo: 2 steps, 1 rollouts" in done.stdout
    assert {"score", "kl", "beta", "value_loss"} <= set(json.loads(
        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]))
    failed = run_cli("align", "grpo", *common, "--reward", "fraction:a", "--group_size", "1")
    assert_one_line_error(failed.stderr, "group_size=1 must be >= 2", failed.returncode)
