"""--train.activation_checkpointing: each transformer block recomputed in backward gives the very gradients of a
stored forward, in every family (causal, masked, seq2seq encoder + decoder), dropout included; never with a cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import build_model
from lmforge.nn.block import Block
from lmforge.train import TrainConfig, train
from lmforge.train.loop import use_activation_checkpointing

FAMILIES = {"causal": "tiny", "masked": "tiny-bert", "seq2seq": "tiny-t5"}


def batch_for(family: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    if family == "masked":
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        return {"input_ids": ids, "labels": labels}
    if family == "seq2seq":
        return {"input_ids": ids, "labels": ids.flip(-1)[:, :7]}
    return {"input_ids": ids, "labels": ids}


def gradients_and_block_runs(family: str, checkpointing: bool, monkeypatch) -> tuple[dict, int, int]:
    """(gradients, how many times a block's forward ran, tensors autograd kept for backward)."""
    runs = []
    forward = Block.forward

    def counted(self, *args, **kwargs):
        runs.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counted)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(FAMILIES[family], dropout=0.1)).train()
    use_activation_checkpointing(model, checkpointing)
    kept = []
    torch.manual_seed(1)  # the same dropout masks in both runs: checkpoint() replays the RNG on recompute
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        loss = model(**batch_for(family)).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(runs), len(kept)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpointed_blocks_give_identical_gradients(family, monkeypatch):
    stored, stored_runs, stored_kept = gradients_and_block_runs(family, False, monkeypatch)
    recomputed, recomputed_runs, recomputed_kept = gradients_and_block_runs(family, True, monkeypatch)
    assert recomputed_runs == 2 * stored_runs  # every block (encoder and decoder) ran again in backward
    assert recomputed_kept < stored_kept / 2  # and kept only its input, not its activations, for backward
    assert stored.keys() == recomputed.keys() and len(stored) > 10
    for name, grad in stored.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)


def test_no_recomputation_without_gradients_and_generation_unchanged():
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_preset("tiny")).train()
    checkpointed = build_model(plain.cfg).train()
    checkpointed.load_state_dict(plain.state_dict())
    use_activation_checkpointing(checkpointed, True)
    calls = []
    for block in checkpointed.decoder.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        checkpointed(ids)
    assert len(calls) == len(checkpointed.decoder.blocks)  # once each: nothing kept for a backward to redo
    greedy = SamplingConfig(max_new_tokens=5, greedy=True)
    assert generate(checkpointed, [[5, 6, 7]], greedy) == generate(plain, [[5, 6, 7]], greedy)


def test_the_training_flag_turns_it_on_and_needs_transformer_blocks(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1, batch_size=2, device="cpu", progress=False, activation_checkpointing=True)
    train(model, lambda i: {"input_ids": ids, "labels": ids}, cfg)
    assert model.decoder.activation_checkpointing
    with pytest.raises(UserError, match="activation_checkpointing"):
        train(torch.nn.Linear(2, 2), lambda i: {}, cfg)
