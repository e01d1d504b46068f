"""BERT and T5 folders made by `transformers.save_pretrained` load into lmforge with the same outputs, save
back to folders transformers reads the same way, and round-trip exactly. Tiny random models, nothing downloaded."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturb
from lmforge.checkpoint import model_tensors
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.interop import architecture_of, load, save_hf
from lmforge.models import Encoder, MaskedLM, Seq2SeqLM, SequenceClassifier, TokenClassifier, build_model
from lmforge.tokenizer import train_unigram

transformers = pytest.importorskip("transformers")
generation = importlib.import_module("lmforge.generate")  # `lmforge.generate` the attribute is the function

VOCAB = 99
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2)
BERT_CASES = {  # name: (transformers auto class, config overrides, lmforge class)
    "masked-lm": ("AutoModelForMaskedLM", {}, MaskedLM),
    "masked-lm-gelu-new-untied": ("AutoModelForMaskedLM", dict(hidden_act="gelu_new", tie_word_embeddings=False),
                                  MaskedLM),
    "bare": ("AutoModel", {}, Encoder),
    "sequence": ("AutoModelForSequenceClassification",
                 dict(id2label={0: "negative", 1: "neutral", 2: "positive"}), SequenceClassifier),
    "token-relu": ("AutoModelForTokenClassification", dict(num_labels=5, hidden_act="relu"), TokenClassifier),
}
T5 = dict(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
T5_CASES = {
    "v1.0": dict(d_kv=8, feed_forward_proj="relu"),
    "v1.1": dict(d_kv=6, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "gated-silu": dict(d_kv=8, feed_forward_proj="gated-silu"),
}


def saved_bert(tmp_path, name):
    auto, overrides, _ = BERT_CASES[name]
    torch.manual_seed(0)
    config = transformers.BertConfig(**BERT, **overrides)
    hf = getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def saved_t5(tmp_path, name):
    torch.manual_seed(0)
    config = transformers.T5Config(**T5, **T5_CASES[name])
    hf = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()
    if T5_CASES[name].get("tie_word_embeddings") is False and hf.lm_head.weight is hf.shared.weight:
        hf.config.tie_word_embeddings = False  # transformers 5 ties T5's head regardless: untie it by hand
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
    perturb(hf)
    with torch.no_grad():  # a random tied T5 mostly echoes its input; louder sublayers and positions vary the output
        for key, p in hf.named_parameters():
            loud = key.endswith(("o.weight", "wo.weight"))
            p.mul_(10.0 if "relative_attention_bias" in key else 3.0 if loud else 1.0)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def bert_inputs():
    """A right-padded batch with two segments."""
    ids = torch.randint(0, VOCAB, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def bert_outputs(model, inputs):
    """The head's logits, or the hidden states of a bare encoder, from either library."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(model, Encoder):
        return out.hidden if out.logits is None else out.logits
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_tensors(a, b):
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("name", sorted(BERT_CASES))
def test_bert_folders_load_with_matching_outputs_and_save_back(tmp_path, name):
    hf, folder = saved_bert(tmp_path, name)
    ours, _ = load(folder)
    assert type(ours) is BERT_CASES[name][2]
    inputs = bert_inputs()
    expected = bert_outputs(hf, inputs)
    assert (bert_outputs(ours, inputs) - expected).abs().max() <= 1e-4
    if name == "sequence":
        assert ours.cfg.labels == ["negative", "neutral", "positive"]

    save_hf(tmp_path / "back", ours)  # lmforge -> HF: transformers loads it with the same outputs
    auto = getattr(transformers, BERT_CASES[name][0])
    again, info = auto.from_pretrained(tmp_path / "back", attn_implementation="eager", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}  # BertModel: lmforge has none
    assert type(again) is type(hf) and again.config.id2label == hf.config.id2label
    assert (bert_outputs(again.eval(), inputs) - expected).abs().max() <= 1e-4
    assert_same_tensors(ours, load(tmp_path / "back")[0])  # HF -> lmforge -> HF -> lmforge is exact


def t5_inputs():
    ids = torch.randint(2, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    decoder = torch.randint(2, VOCAB, (3, 7))
    decoder[:, 0] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)


def t5_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", sorted(T5_CASES))
def test_t5_folders_load_with_matching_logits_and_save_back(tmp_path, name):
    hf, folder = saved_t5(tmp_path, name)
    ours, _ = load(folder)
    assert isinstance(ours, Seq2SeqLM)
    assert ours.cfg.tie_embeddings == (name != "v1.1")
    assert ours.cfg.logits_scale == (1.0 if name == "v1.1" else 32 ** -0.5)
    inputs = t5_inputs()
    expected = t5_logits(hf, inputs)
    assert (t5_logits(ours, inputs) - expected).abs().max() <= 1e-4

    save_hf(tmp_path / "back", ours)
    again, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back", attn_implementation="eager",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (t5_logits(again.eval(), inputs) - expected).abs().max() <= 1e-4
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["decoder_start_token_id"] == 0
    assert_same_tensors(ours, load(tmp_path / "back")[0])


@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_t5_greedy_generation_matches_transformers_for_32_steps(tmp_path, name):
    hf, folder = saved_t5(tmp_path, name)
    ours, _ = load(folder)
    prompts = [[5, 17, 42, 9, 33, 8, 1], [12, 60, 1]]
    got = generation.generate(ours, prompts, SamplingConfig(greedy=True, max_new_tokens=32, stop_at_eos=False))
    ids = torch.tensor([prompts[0], prompts[1] + [0] * 4])
    mask = (torch.arange(7) < torch.tensor([[7], [3]])).long()
    hf.generation_config.eos_token_id = None  # no EOS to stop at or suppress: lmforge emits whatever is argmax
    with torch.no_grad():  # no cache: transformers sizes T5's by num_layers, wrong when num_decoder_layers differs
        expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                               min_new_tokens=32, use_cache=False)
    assert expected[:, 0].tolist() == [0, 0]  # the decoder start token
    assert len({token for row in got for token in row}) >= 5  # not one token repeated
    assert got == expected[:, 1:].tolist()


LMFORGE_CASES = {
    "causal": dict(preset="tiny"),
    "masked-lm": dict(preset="tiny-bert"),
    "masked-lm-untied-gelu-tanh": dict(preset="tiny-bert", tie_embeddings=False, mlp="gelu_tanh"),
    "bare": dict(preset="tiny-bert", head="none"),
    "sequence": dict(preset="tiny-bert", head="sequence", num_labels=2, labels=["no", "yes"]),
    "token": dict(preset="tiny-bert", head="token", num_labels=4),
    "t5-v1.0": dict(preset="tiny-t5"),
    "t5-v1.1": dict(preset="tiny-t5", mlp="geglu", tie_embeddings=False, logits_scale=1.0, d_head=12,
                    n_decoder_layers=3),
    "t5-tied-unscaled": dict(preset="tiny-t5", mlp="swiglu", logits_scale=1.0, decoder_start_id=3),
}


@pytest.mark.parametrize("name", sorted(LMFORGE_CASES))
def test_lmforge_models_round_trip_through_hf_folders_exactly(tmp_path, name):
    spec = dict(LMFORGE_CASES[name])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(spec.pop("preset"), **spec)).eval()
    perturb(model)
    save_hf(tmp_path / "hf", model)
    back, _ = load(tmp_path / "hf")
    assert type(back) is type(model)
    assert (back.cfg.labels, back.cfg.num_labels) == (model.cfg.labels, model.cfg.num_labels)
    assert back.cfg.decoder_start_id == model.cfg.decoder_start_id
    assert_same_tensors(model, back)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == architecture_of(model.cfg)


def test_generation_config_carries_the_tokenizer_ids(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"] * 20
    tokenizer = train_unigram(texts, vocab_size=120, num_sentinels=3)
    model = build_model(ModelConfig.from_preset("tiny-t5", vocab_size=tokenizer.vocab_size))
    save_hf(tmp_path / "hf", model, tokenizer)
    saved = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert saved["decoder_start_token_id"] == 0
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (tokenizer.eos_id, tokenizer.pad_id)
    assert "bos_token_id" not in saved  # T5's tokenizer has none
    config = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (config.decoder_start_token_id, config.eos_token_id) == (0, tokenizer.eos_id)
    save_hf(tmp_path / "bert", build_model(ModelConfig.from_preset("tiny-bert")))
    assert not (tmp_path / "bert" / "generation_config.json").exists()  # encoders do not generate


def test_tied_duplicates_and_unused_weights_hf_stores_are_accepted(tmp_path):
    _, folder = saved_t5(tmp_path, "v1.0")
    reference, _ = load(folder)
    weights = load_file(str(folder / "model.safetensors"))
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        weights[alias] = weights["shared.weight"].clone()
    weights["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(weights, str(folder / "model.safetensors"))
    assert_same_tensors(reference, load(folder)[0])
    weights["decoder.embed_tokens.weight"] += 1
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"'decoder\.embed_tokens\.weight' should be a tied copy of 'shared\.weight'"):
        load(folder)

    _, folder = saved_bert(tmp_path / "bert", "masked-lm")  # the layout of bert-base-uncased on the Hub
    reference, _ = load(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"].clone()
    weights["cls.predictions.decoder.bias"] = weights["cls.predictions.bias"].clone()
    weights["bert.embeddings.position_ids"] = torch.arange(40)[None]
    for name, shape in (("bert.pooler.dense.weight", (32, 32)), ("bert.pooler.dense.bias", (32,)),
                        ("cls.seq_relationship.weight", (2, 32)), ("cls.seq_relationship.bias", (2,))):
        weights[name] = torch.zeros(shape)
    save_file(weights, str(folder / "model.safetensors"))
    assert_same_tensors(reference, load(folder)[0])


@pytest.mark.parametrize("name", ["bare", "sequence"])
def test_bert_keys_load_with_or_without_the_bert_prefix(tmp_path, name):
    _, folder = saved_bert(tmp_path, name)
    reference, _ = load(folder)
    weights = load_file(str(folder / "model.safetensors"))
    flipped = {k.removeprefix("bert.") if k.startswith("bert.") else f"bert.{k}" if k.startswith(("embeddings.",
               "encoder.", "pooler.")) else k: v for k, v in weights.items()}
    assert flipped.keys() != weights.keys()
    save_file(flipped, str(folder / "model.safetensors"))
    assert_same_tensors(reference, load(folder)[0])


def test_bert_head_comes_from_the_weights_without_architectures(tmp_path):
    for name, cls in (("token-relu", TokenClassifier), ("sequence", SequenceClassifier), ("bare", Encoder)):
        _, folder = saved_bert(tmp_path / name, name)
        config = json.loads((folder / "config.json").read_text())
        del config["architectures"]
        (folder / "config.json").write_text(json.dumps(config))
        assert type(load(folder)[0]) is cls


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_model_types_and_refused_options_are_named(tmp_path):
    _, folder = saved_bert(tmp_path, "masked-lm")
    edit_config(folder, model_type="roberta")
    with pytest.raises(UserError, match=r"'roberta' is not supported.*gpt2, llama, mistral, qwen2.*bert.*t5"):
        load(folder)
    for option, value in (("position_embedding_type", "relative_key"), ("is_decoder", True),
                          ("hidden_act", "silu")):
        edit_config(folder, model_type="bert", **{option: value})
        with pytest.raises(UserError, match=f"{option}={value!r}"):
            load(folder)
        edit_config(folder, **{option: dict(position_embedding_type="absolute", hidden_act="gelu").get(option)})
    edit_config(folder, architectures=["BertForQuestionAnswering"])
    with pytest.raises(UserError, match="BertForQuestionAnswering is not supported"):
        load(folder)

    _, folder = saved_t5(tmp_path / "t5", "v1.0")
    for changes, named in ((dict(feed_forward_proj="gated-relu", is_gated_act=True), "feed_forward_proj='gated-relu'"),
                           (dict(feed_forward_proj="relu", is_gated_act=True), "is_gated_act=True")):
        edit_config(folder, **changes)
        with pytest.raises(UserError, match=named):
            load(folder)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    _, folder = saved_bert(tmp_path, "sequence")
    weights = load_file(str(folder / "model.safetensors"))
    extra = dict(weights, **{"bert.encoder.layer.7.output.dense.weight": torch.zeros(32, 48)})
    save_file(extra, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"would ignore: \['bert\.encoder\.layer\.7\.output\.dense\.weight'\]"):
        load(folder)
    del weights["bert.pooler.dense.bias"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"no weight 'bert\.pooler\.dense\.bias'"):
        load(folder)
    edit_config(folder, id2label={"0": "no", "1": "yes"})  # 2 labels, a classifier of 3 rows
    weights["bert.pooler.dense.bias"] = torch.zeros(32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"weight 'classifier\.weight' .* has shape \(3, 32\), the model \(2, 32\)"):
        load(folder)

    _, folder = saved_t5(tmp_path / "t5", "v1.1")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["decoder.block.2.layer.2.DenseReluDense.wi_1.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"no weight 'decoder\.block\.2\.layer\.2\.DenseReluDense\.wi_1\.weight'"):
        load(folder)


@pytest.mark.parametrize(("preset", "overrides", "named"), [
    ("tiny-bert", dict(positions="rope"), r"BERT equivalent: positions='rope'"),
    ("tiny-bert", dict(head="sequence", num_labels=2, pooling="mean"), r"pooling='mean'"),
    ("tiny-bert", dict(norm_placement="pre"), r"norm_placement='pre'"),
    ("tiny-t5", dict(tie_embeddings=False), r"T5 equivalent: logits_scale=0\.125 with tie_embeddings=False"),
    ("tiny-t5", dict(mlp="relu2"), r"mlp='relu2'"),
])
def test_configs_without_an_exact_hf_equivalent_are_refused(tmp_path, preset, overrides, named):
    model = build_model(ModelConfig.from_preset(preset, **overrides))
    with pytest.raises(UserError, match=named):
        save_hf(tmp_path / "hf", model)
