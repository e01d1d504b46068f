"""`adapters_disabled`: under the switch a fine-tuned model computes exactly its base (the reference a LoRA
policy needs for a KL penalty, with no second copy of the model)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.peft import adapters_disabled, apply_method, merge_lora, unmerge_lora

OPTIONS = {
    "lora": {"targets": ["all"], "r": 4},
    "qlora": {"targets": ["q", "v"], "r": 4, "block_size": 32},
    "adapter": {"bottleneck": 4},
    "prompt": {"n_tokens": 3},
    "prefix": {"n_tokens": 3},
}
IDS = torch.tensor([[5, 9, 2, 7, 1, 3, 8, 4], [6, 6, 1, 0, 2, 9, 3, 5]])


def _train_a_few_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """Move every added tensor away from its (often exactly neutral) initial value."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    model.train()
    for _ in range(steps):
        logits = model(IDS).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_logits_under_the_switch_are_exactly_the_base_after_training(method):
    model = make_model("tiny")
    with torch.no_grad():
        base = model(IDS).logits.clone()
    apply_method(model, method, **OPTIONS[method])
    with torch.no_grad():
        fresh = model(IDS).logits.clone()  # qlora: the NF4 base, which is what the switch must give back
    _train_a_few_steps(model)
    if method in ("lora", "qlora"):
        assert all(u.B.abs().max() > 0 for m in model.modules() if hasattr(m, "lora") for u in m.lora.values())
    with torch.no_grad():
        trained = model(IDS).logits.clone()
        with adapters_disabled(model):
            switched = model(IDS).logits.clone()
        after = model(IDS).logits
    expected = fresh if method == "qlora" else base
    assert torch.equal(switched, expected)
    assert not torch.allclose(trained, expected, atol=1e-4)  # the adapter did move the model
    assert torch.equal(after, trained)  # restored on exit
    if method in ("lora", "adapter"):  # a zero-initialised update started exactly at the base
        assert torch.equal(fresh, base)


def test_the_switch_is_restored_after_an_exception_and_nests():
    model = make_model("tiny")
    with torch.no_grad():
        base = model(IDS).logits.clone()
    apply_method(model, "lora", targets=["q", "v"], r=2)
    _train_a_few_steps(model, steps=2)
    with torch.no_grad():
        trained = model(IDS).logits.clone()
        with pytest.raises(RuntimeError), adapters_disabled(model):
            raise RuntimeError("inside")
        assert torch.equal(model(IDS).logits, trained)  # the exception did not leave the adapter off
        with adapters_disabled(model):
            with adapters_disabled(model):
                assert torch.equal(model(IDS).logits, base)
            assert torch.equal(model(IDS).logits, base)  # leaving the inner switch keeps the outer one's state
        assert torch.equal(model(IDS).logits, trained)


def test_generation_under_the_switch_equals_the_base_model():
    base = make_model("tiny")
    greedy = SamplingConfig(greedy=True, max_new_tokens=6)
    expected = generate(base, [[5, 9, 2], [7]], greedy)
    model = apply_method(base, "prompt", n_tokens=2)
    _train_a_few_steps(model)
    with adapters_disabled(model):
        assert generate(model, [[5, 9, 2], [7]], greedy) == expected


def test_a_merged_lora_cannot_be_switched_off_until_unmerged():
    model = make_model("tiny")
    with torch.no_grad():
        base = model(IDS).logits.clone()
    apply_method(model, "lora", targets=["q"], r=2)
    _train_a_few_steps(model, steps=1)
    merge_lora(model, unload=False)
    with pytest.raises(UserError, match="unmerge_lora"), adapters_disabled(model):
        model(IDS)  # never reached: entering the switch is refused
    unmerge_lora(model)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.allclose(model(IDS).logits, base, atol=1e-5)  # unmerge restores the base within rounding
