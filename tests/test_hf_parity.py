"""Numerical parity with `transformers` on the same weights (GPT-2 and Llama layouts)."""

import pytest
import torch

from conftest import make_model, perturb
from lmforge.checkpoint import model_tensors
from lmforge.generate import SamplingConfig, generate
from lmforge.interop import from_hf_state_dict, hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": dict(preset="tiny"),
    "gpt2-untied": dict(preset="tiny", tie_embeddings=False),
    "llama-gqa": dict(preset="tiny-llama"),
    "llama-mha-tied": dict(preset="tiny-llama", n_kv_heads=None, tie_embeddings=True, rope_theta=500000.0),
}


def hf_twin(model):
    """The same weights in a `transformers` model built from the mapped config."""
    config = transformers.AutoConfig.for_model(**hf_config(model.cfg), bos_token_id=0, eos_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.cfg, model_tensors(model)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied head
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_including_padded_batches(case):
    spec = dict(CASES[case])
    model = make_model(spec.pop("preset"), **spec)
    perturb(model, scale=0.02)  # move off the init so biases and norms matter
    hf = hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate() passes for left padding
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_greedy_generation_matches_transformers_for_32_steps(case):
    spec = dict(CASES[case])
    model = make_model(spec.pop("preset"), **spec)
    perturb(model, scale=0.2)  # at the init every step picks one or two tokens: move the weights so it varies
    hf = hf_twin(model)
    prompt = [5, 17, 42, 9]
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=32, greedy=True))[0]
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long), do_sample=False,
                         max_new_tokens=32, min_new_tokens=32, pad_token_id=0, eos_token_id=None)[0, 4:].tolist()
    assert len(set(ours)) >= 5, ours  # not one token repeated
    assert ours == theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_mapping_round_trips_exactly(case):
    spec = dict(CASES[case])
    model = make_model(spec.pop("preset"), **spec)
    tensors = model_tensors(model)
    back = from_hf_state_dict(model.cfg, to_hf_state_dict(model.cfg, tensors))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
