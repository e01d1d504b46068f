"""LoRA adapters cross to and from Hugging Face `peft` with the same logits, on a tiny GQA Llama and a
tiny GPT-2 whose base folders `lmforge.interop.save_hf` writes."""

import copy
import json

import pytest
import torch

from conftest import make_model
from lmforge.interop import load, load_peft_adapter, save_hf, save_peft_adapter
from lmforge.peft import apply_method, merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASES = {"llama-gqa": "tiny-llama", "gpt2": "tiny"}
# lmforge targets chosen to exercise the mapping: separate q/v rows of GPT-2's fused c_attn become one
# block-diagonal rank-2r LoRA; a rank override lands in peft's rank/alpha patterns.
OURS = {"llama-gqa": dict(targets="all", r=4, alpha=8, rank_pattern={"down": 2}),
        "gpt2": dict(targets="q,v,o,up,down", r=4, alpha=8, rank_pattern={"o": 2})}
THEIRS = {"llama-gqa": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 4}),
          "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, rank_pattern={"c_fc": 2})}


@pytest.fixture(params=sorted(BASES))
def base(request, tmp_path):
    """(name, lmforge base model, its HF folder)."""
    model = make_model(BASES[request.param])
    save_hf(tmp_path / "base", model)
    return request.param, model, tmp_path / "base"


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def randomize(parameters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_lmforge_lora_loads_into_peft_with_the_same_logits(base, tmp_path):
    name, model, folder = base
    ours = apply_method(copy.deepcopy(model), "lora", **OURS[name]).eval()
    randomize(p for n, p in ours.named_parameters() if n.endswith(".B"))
    save_peft_adapter(tmp_path / "adapter", ours, base_model_name_or_path=str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (name == "gpt2")

    theirs = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "adapter").eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(input_ids=ids).logits
        assert max_diff(got, expected) <= 1e-4
        assert max_diff(hf_model(folder)(input_ids=ids).logits, expected) > 1e-3  # the adapter matters
        merged_theirs = theirs.merge_and_unload()(input_ids=ids).logits
        merged_ours = merge(ours)(ids).logits
    assert max_diff(merged_theirs, expected) <= 1e-4 and max_diff(merged_ours, expected) <= 1e-4


def test_peft_adapter_loads_into_lmforge_with_the_same_logits(base, tmp_path):
    name, _, folder = base
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **THEIRS[name])
    theirs = peft.get_peft_model(hf_model(folder), config)
    randomize(p for n, p in theirs.named_parameters() if "lora_B" in n)
    theirs.save_pretrained(tmp_path / "adapter")

    ours, _ = load(folder)
    load_peft_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits
        assert max_diff(ours(ids).logits, expected) <= 1e-4
        assert max_diff(merge(ours)(ids).logits, expected) <= 1e-4

    again, _ = load(folder)  # and back out: peft reads what lmforge re-saves
    load_peft_adapter(again, tmp_path / "adapter")
    save_peft_adapter(tmp_path / "resaved", again)
    with torch.no_grad():
        resaved = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "resaved").eval()
        assert max_diff(resaved(input_ids=ids).logits, expected) <= 1e-4
