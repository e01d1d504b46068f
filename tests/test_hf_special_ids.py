"""The special-token ids of a Hugging Face config.json survive HF → lmforge → HF without a tokenizer, for every
family: before, an export without a tokenizer left them out and transformers filled in its class defaults
(a GPT-2 with bos/eos 0 came back with 50256, outside its vocabulary)."""

import dataclasses
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.interop import load, save_hf
from lmforge.models import build_model
from lmforge.tokenizer import train_char

transformers = pytest.importorskip("transformers")

KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
SIZES = dict(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
# Non-default ids everywhere (transformers' defaults: GPT-2 50256/50256, Llama 1/2, BERT pad 0, T5 pad 0 eos 1).
FOLDERS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=131, n_positions=32, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0,
        pad_token_id=1)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, bos_token_id=5, eos_token_id=[6, 7], pad_token_id=3)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        **SIZES, bos_token_id=8, eos_token_id=9, pad_token_id=3)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=131, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=2, eos_token_id=5,
        decoder_start_token_id=4)),
}


def hf_folder(tmp_path, name):
    torch.manual_seed(0)
    FOLDERS[name]().save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    return tmp_path / "hf"


def ids_of(folder):
    config = json.loads((folder / "config.json").read_text())
    return {key: config.get(key, "absent") for key in KEYS}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_special_ids_survive_load_and_save_hf(tmp_path, name):
    source = hf_folder(tmp_path, name)
    model, tokenizer = load(source)
    assert tokenizer is None
    save_hf(tmp_path / "back", model)
    assert ids_of(tmp_path / "back") == ids_of(source)
    assert ids_of(source)["bos_token_id"] != 50256  # the point: not transformers' GPT-2 default
    config = transformers.AutoConfig.from_pretrained(tmp_path / "back")  # transformers reads them back too
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key, None) == json.loads((source / "config.json").read_text()).get(key)
    if name != "bert":  # models that generate: generation_config.json carries them as well
        generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
        assert generation["eos_token_id"] == ids_of(source)["eos_token_id"]


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_special_ids_survive_convert_through_an_lmforge_checkpoint(tmp_path, name, capsys):
    source = hf_folder(tmp_path, name)
    assert main(["convert", "--from", "hf", "--to", "lmforge", str(source), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert ids_of(tmp_path / "back") == ids_of(source)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())  # the lmforge checkpoint holds them
    assert saved["eos_id"] == ids_of(source)["eos_token_id"]


def test_the_tokenizer_ids_win_and_a_missing_role_keeps_the_source_id(tmp_path):
    tokenizer = train_char(["abcdef"], specials={"eos": "</s>", "pad": "<pad>"})  # no BOS
    cfg = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, bos_id=3, eos_id=4, pad_id=5)
    save_hf(tmp_path / "hf", build_model(cfg), tokenizer)
    assert ids_of(tmp_path / "hf")["bos_token_id"] == 3
    assert (ids_of(tmp_path / "hf")["eos_token_id"], ids_of(tmp_path / "hf")["pad_token_id"]) == \
        (tokenizer.eos_id, tokenizer.pad_id)


def test_config_json_without_the_fields_still_loads_and_bad_ids_are_named():
    old = ModelConfig.from_preset("tiny").to_dict()
    for key in ("bos_id", "eos_id", "pad_id"):
        del old[key]
    assert ModelConfig.from_dict(old) == ModelConfig.from_preset("tiny")  # checkpoints written before the fields
    cfg = ModelConfig.from_preset("tiny", eos_id=[1, 2], pad_id=-1)  # a list of EOS ids and -1 are real configs
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, named in ((dict(bos_id="1"), "model.bos_id='1' must be an integer token id"),
                       (dict(eos_id=[]), "model.eos_id=[] must be an integer token id or a list of them"),
                       (dict(pad_id=True), "model.pad_id=True must be an integer token id")):
        with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")):
            dataclasses.replace(cfg, **bad)
