"""HF folders made by `transformers.save_pretrained` load into lmforge with the same logits, and back."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model, perturb
from lmforge.checkpoint import model_tensors
from lmforge.errors import UserError
from lmforge.interop import load, save_hf
from lmforge.train import save_checkpoint

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "gpt2-exact-gelu-untied": lambda: transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2,
                                                              n_head=4, activation_function="gelu",
                                                              tie_word_embeddings=False),
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=50000.0),
    "llama-tied-bias": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None),
    "qwen2-bias": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
}


def saved_hf_model(tmp_path, name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    perturb(model)  # biases and norms start at 0/1: move them so they matter
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_folder_loads_with_matching_logits_and_saves_back(tmp_path, name):
    hf, folder = saved_hf_model(tmp_path, name)
    ours, _ = load(folder)
    ids = torch.randint(0, 96, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4

    save_hf(tmp_path / "back", ours)  # lmforge -> HF: transformers loads it with the same logits
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max() <= 1e-4
    ours_again, _ = load(tmp_path / "back")  # HF -> lmforge -> HF -> lmforge is exact
    first, second = model_tensors(ours), model_tensors(ours_again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_lmforge_checkpoint_converts_to_hf_and_back_through_the_cli(tmp_path):
    model = make_model("tiny-llama")
    save_checkpoint(tmp_path / "ours", model)
    for args in (["--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")],
                 ["--from", "hf", "--to", "lmforge", str(tmp_path / "hf"), str(tmp_path / "back")]):
        result = subprocess.run([sys.executable, "-m", "lmforge.cli", "convert", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    back, _ = load(tmp_path / "back")
    a, b = model_tensors(model), model_tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_configs_are_named(tmp_path):
    _, folder = saved_hf_model(tmp_path, "llama-gqa")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"rope_scaling\.rope_type='yarn'"):
        load(folder)
    config["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'falcon' is not supported for causal LMs; supported: gpt2"):
        load(folder)


def test_missing_weights_are_named(tmp_path):
    _, folder = saved_hf_model(tmp_path, "gpt2")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"no weight 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        load(folder)


def test_pretrain_can_start_from_an_hf_folder(tmp_path):
    from conftest import SAMPLE_TEXT
    from lmforge import DataConfig, PretrainConfig, TrainConfig, pretrain
    from lmforge.tokenizer import train_char

    tokenizer = train_char([SAMPLE_TEXT])
    source = make_model("tiny-llama", vocab_size=tokenizer.vocab_size)
    save_hf(tmp_path / "hf", source, tokenizer)
    (tmp_path / "code.py").write_text(SAMPLE_TEXT)
    run = pretrain(PretrainConfig(
        out_dir=str(tmp_path / "run"), data=DataConfig(sources=[str(tmp_path / "code.py")]),
        init_from=str(tmp_path / "hf"),
        train=TrainConfig(steps=1, lr=1e-12, warmup_steps=0, weight_decay=0.0, progress=False)))
    before, after = model_tensors(source), model_tensors(run.model.cpu())
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6  # started from those weights
    assert run.tokenizer.encode("def f") == tokenizer.encode("def f")


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch-bin"])
def test_sharded_and_bin_folders_load_the_same_weights(tmp_path, layout):
    hf, folder = saved_hf_model(tmp_path, "llama-gqa")
    reference, _ = load(folder)
    other = tmp_path / layout
    if layout == "sharded-safetensors":
        hf.save_pretrained(other, max_shard_size="40KB")
        assert (other / "model.safetensors.index.json").is_file()
    else:  # transformers 5 writes only safetensors: build the legacy layout by hand
        other.mkdir()
        (other / "config.json").write_text((folder / "config.json").read_text())
        torch.save(load_file(str(folder / "model.safetensors")), other / "pytorch_model.bin")
    loaded, _ = load(other)
    a, b = model_tensors(reference), model_tensors(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_takes_an_hf_folder(tmp_path):
    from conftest import SAMPLE_TEXT
    from lmforge.tokenizer import train_char

    tokenizer = train_char([SAMPLE_TEXT])
    save_hf(tmp_path / "hf", make_model("tiny-llama", vocab_size=tokenizer.vocab_size), tokenizer)
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", "--model", str(tmp_path / "hf"),
                             "--prompt", "def ", "--max_new_tokens", "9", "--greedy"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and len(result.stdout) == len("def ") + 9 + 1
