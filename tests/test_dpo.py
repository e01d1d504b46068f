"""DPO: the loss by hand and against trl's own loss code, ln 2 at step 0, a tiny policy that learns a held-out
preference (full and LoRA), the cached reference, the saved policy, and one-line errors."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.dpo import dpo_loss
from lmforge.checkpoint import save
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import CausalLM, build_model
from lmforge.recipes.align_dpo import DpoConfig, run_dpo
from lmforge.recipes.align_reward import PreferenceDataConfig
from lmforge.recipes.finetune import MethodOptions
from lmforge.tokenizer import DEFAULT_SPECIALS, train_char
from lmforge.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "tree", "red", "big"]


def _logps(seed: int = 0, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_the_hand_formula(smoothing):
    pc, pr, rc, rr = _logps()
    beta = 0.3
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, smoothing)
    expected = []
    for i in range(len(pc)):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        sig = 1 / (1 + math.exp(-z))
        expected.append(-(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert metrics["reward_chosen"].item() == pytest.approx(chosen.mean().item())
    assert metrics["reward_margin"].item() == pytest.approx((chosen - rejected).mean().item())
    assert metrics["reward_accuracy"].item() == pytest.approx((chosen > rejected).double().mean().item())
    assert metrics["logp_margin"].item() == pytest.approx((pc - pr).mean().item())


def test_policy_equal_to_reference_gives_ln2():
    pc, pr, _, _ = _logps(1)
    loss, metrics = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert metrics["reward_margin"].item() == 0 and metrics["reward_accuracy"].item() == 0


def _trl_loss(pc, pr, rc, rr, beta, smoothing, loss_type):
    """trl 1.16's DPOTrainer._compute_loss, run unbound on a stand-in trainer and model: the model's per-token
    log-probs are one column holding each sequence's summed log-prob; the reference ones come precomputed."""
    from trl import DPOTrainer

    batch = torch.cat([pc, pr])[:, None]
    outputs = SimpleNamespace(log_probs=batch, entropy=torch.zeros_like(batch), mean_logits=torch.zeros_like(batch),
                              is_top1=torch.zeros_like(batch, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    completion_mask = torch.tensor([[0, 1]] * len(batch))
    inputs = {"input_ids": torch.ones_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False), trainer._metrics


def test_sigmoid_loss_equals_trl():
    pytest.importorskip("trl")
    pc, pr, rc, rr = _logps(2, n=8)
    ours, metrics = dpo_loss(pc, pr, rc, rr, beta=0.25)
    theirs, logged = _trl_loss(pc, pr, rc, rr, 0.25, 0.0, "sigmoid")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert metrics["reward_accuracy"].item() == pytest.approx(logged["train"]["rewards/accuracies"][0])
    assert metrics["reward_margin"].item() == pytest.approx(logged["train"]["rewards/margins"][0])
    assert metrics["reward_chosen"].item() == pytest.approx(logged["train"]["rewards/chosen"][0])


def test_label_smoothed_loss_equals_trl():
    """trl 1.16's "sigmoid" loss has no label smoothing; its "aot" loss is -(1-eps) logsig(beta D) - eps logsig(-beta D)
    over D sorted across the batch, which on a one-pair batch is exactly conservative DPO: compare pair by pair."""
    pytest.importorskip("trl")
    pc, pr, rc, rr = _logps(3, n=5)
    for i in range(5):
        one = [t[i:i + 1] for t in (pc, pr, rc, rr)]
        ours, _ = dpo_loss(*one, beta=0.5, label_smoothing=0.15)
        theirs, _ = _trl_loss(*one, 0.5, 0.15, "aot")
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_bad_beta_and_smoothing_are_one_line_errors():
    pc, pr, rc, rr = _logps()
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"beta=.* must be a positive number"):
            dpo_loss(pc, pr, rc, rr, beta)
        with pytest.raises(UserError, match="must be a positive number"):
            DpoConfig(model="m", beta=beta)
    with pytest.raises(UserError, match=r"label_smoothing=0.5 must be in \[0, 0.5\)"):
        DpoConfig(model="m", label_smoothing=0.5)


# -- the recipe ----------------------------------------------------------------------------------------------------

def _pairs(path, n: int, seed: int = 0) -> None:
    """The chosen answer says yes, the rejected one no, then the same few random words."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            prompt = "q " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + ":"
            f.write(json.dumps({"prompt": prompt, "chosen": f" yes {tail}", "rejected": f" no {tail}"}) + "\n")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo") / "base"
    tokenizer = train_char([" ".join(WORDS) + " yesnoq:"], DEFAULT_SPECIALS)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.1))
    save(folder, model, tokenizer)
    return folder


def _dpo(tmp_path, base, **overrides) -> DpoConfig:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        _pairs(data, 200)
    values = dict(model=str(base), prefs=PreferenceDataConfig(data=str(data), eval_fraction=0.2), beta=0.5,
                  out_dir=str(tmp_path / "dpo"),
                  train=TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=0, eval_batches=2,
                                    log_every=1, progress=False))
    return DpoConfig(**{**values, **overrides})


def test_dpo_learns_a_held_out_preference_and_saves_a_normal_checkpoint(tmp_path, base_model, capsys):
    result = run_dpo(_dpo(tmp_path, base_model))
    report = result.report
    before, after = report["before"], report["held_out"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference, scored the same way
    assert before["reward_margin"] == 0.0
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0, rounded
    assert after["reward_accuracy"] > 0.9 and after["reward_margin"] > 0.5, after
    assert after["loss"] < 0.5
    assert "read" not in capsys.readouterr().out.split("reference log-probs:")[1].split("\n")[0]
    policy, tokenizer = load(tmp_path / "dpo" / "checkpoint")
    assert isinstance(policy, CausalLM) and tokenizer is not None
    assert policy.cfg.dropout == 0.1  # the config is the model's own; only training ran without dropout
    # a second run over the same reference and data reads the cached reference log-probs
    run_dpo(_dpo(tmp_path, base_model, overwrite=True, train=TrainConfig(steps=1, batch_size=8, progress=False)))
    assert "reference log-probs: read from the cache" in capsys.readouterr().out


def test_lora_policy_reference_is_the_base(tmp_path, base_model):
    """With LoRA the reference log-probs come from the base before the adapter: at step 0 the adapter is zero,
    so the policy equals the base and the held-out loss is ln 2; the adapter is saved as finetune saves it."""
    cfg = _dpo(tmp_path, base_model, method="lora", peft=MethodOptions(r=4, targets=["all"]),
               train=TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, eval_batches=2,
                                 progress=False))
    result = run_dpo(cfg)
    assert result.report["before"]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert result.report["held_out"]["reward_margin"] > 0
    saved = tmp_path / "dpo" / "checkpoint"
    assert (saved / "method.json").is_file() and json.loads((saved / "method.json").read_text())["method"] == "lora"


def test_bad_pair_files_are_one_line_errors(tmp_path, base_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": " yes", "rejected": ""}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: the 'rejected' completion is empty") as err:
        run_dpo(_dpo(tmp_path, base_model, prefs=PreferenceDataConfig(data=str(data))))
    assert "\n" not in str(err.value)
    data.write_text(json.dumps({"prompt": "q", "chosen": " yes"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1 has no 'rejected' field"):
        run_dpo(_dpo(tmp_path, base_model, prefs=PreferenceDataConfig(data=str(data))))
    with pytest.raises(UserError, match="needs --model"):
        run_dpo(DpoConfig())


def test_logsigmoid_zero_is_minus_ln2():
    assert F.logsigmoid(torch.zeros(())).item() == pytest.approx(-math.log(2), abs=1e-7)


def test_resume_reuses_the_cached_reference_and_changed_data_does_not(tmp_path, base_model, capsys):
    short = dict(batch_size=4, lr=1e-3, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1, progress=False)
    run_dpo(_dpo(tmp_path, base_model, train=TrainConfig(steps=2, **short)))
    assert "reference log-probs: computed" in capsys.readouterr().out
    run_dpo(_dpo(tmp_path, base_model, resume=True, train=TrainConfig(steps=3, **short)))
    assert "reference log-probs: read from the cache" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
    _pairs(tmp_path / "pairs.jsonl", 200, seed=1)  # other pairs: the cache no longer fits
    run_dpo(_dpo(tmp_path, base_model, overwrite=True, train=TrainConfig(steps=1, **short)))
    assert "reference log-probs: computed" in capsys.readouterr().out


def test_prompts_get_one_bos_and_completions_an_eos():
    from lmforge.align.dpo import encode_preference_pairs
    from lmforge.data.preferences import PreferencePair
    tokenizer = train_char(["abc"], DEFAULT_SPECIALS)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    data = encode_preference_pairs([PreferencePair("ab", "c", "a"), PreferencePair("<s>ab", "c", "a")], tokenizer)
    assert data.prompts[0] == [bos, *tokenizer.encode("ab")] == data.prompts[1]
    assert data.chosen[0] == [*tokenizer.encode("c"), eos]


def test_cli_align_dpo_trains_and_refuses_bad_input(tmp_path, base_model):
    from conftest import assert_one_line_error, run_cli
    data = tmp_path / "pairs.jsonl"
    _pairs(data, 40)
    done = run_cli("align", "dpo", "--model", str(base_model), "--prefs.data", str(data), "--beta", "0.5",
                   "--out_dir", str(tmp_path / "run"), "--train.steps", "2", "--train.batch_size", "4",
                   "--train.progress", "false")
    assert done.returncode == 0, done.stderr
    assert "held-out implicit-reward accuracy" in done.stdout
    assert json.loads((tmp_path / "run" / "dpo_report.json").read_text())["steps"] == 2
    done = run_cli("align", "dpo", "--model", str(base_model), "--prefs.data", str(data), "--beta", "-1")
    assert_one_line_error(done.stderr, "beta=-1.0 must be a positive number", done.returncode)
