"""Corners with no other test (issue 17): uint32 token shards, weight-decay groups, baked prefixes, generation's
user errors, classification data, the architecture pieces with no Hugging Face twin (sinusoidal table, ReLU² MLP,
FLOP counts) checked against formulas written out here, and the conftest hook that makes skips fail on CI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from lmforge.config import ModelConfig
from lmforge.data.labelled import ClassificationBatches, encode_labelled, read_labelled
from lmforge.data.shards import build_shard, load_shard
from lmforge.errors import UserError
from lmforge.estimate import flops_per_token
from lmforge.generate import SamplingConfig, fill_mask, generate
from lmforge.models import MaskedLM, Seq2SeqLM
from lmforge.nn.mlp import MLP
from lmforge.nn.positions import sinusoidal_table
from lmforge.peft import apply_method
from lmforge.peft.core import method_of
from lmforge.peft.prefix import bake_prefixes, self_attention_stacks
from lmforge.tokenizer import train_char
from lmforge.train.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------- token shards


def _wide_alphabet(size: int) -> list[str]:
    """`size` distinct characters above Latin-1, skipping the surrogate block."""
    return [chr(c) for c in range(0x100, 0x100 + size + 0x800) if not 0xD800 <= c <= 0xDFFF][:size]


def test_a_vocabulary_above_65536_stores_uint32_ids_that_round_trip_exactly(tmp_path):
    alphabet = _wide_alphabet(70_000)
    tokenizer = train_char(["".join(alphabet)], specials={"eos": "<eos>"})
    assert tokenizer.vocab_size == 70_001 and tokenizer.eos_id == 70_000
    docs = ["".join(alphabet[i] for i in (0, 65_535, 65_536, 69_999)), "".join(alphabet[-3:]), alphabet[12_345]]
    expected = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eos_id]]
    assert max(expected) > 65_535 and 65_536 in expected  # ids a uint16 file would wrap to 0..4464
    built = build_shard(docs, tokenizer, tmp_path / "shard", val_fraction=0.25, batch_docs=2)
    assert built.meta["dtype"] == "uint32" and built.meta["tokens"] == len(expected)
    again = load_shard(tmp_path / "shard")
    assert again.train.dtype == np.uint32
    assert np.concatenate([again.train, again.val]).tolist() == expected
    assert len(again.val) == int(len(expected) * 0.25)
    assert (tmp_path / "shard" / "tokens.bin").stat().st_size == 4 * len(expected)


# ---------------------------------------------------------------------------------------------- optimizer


def test_weight_decay_falls_on_matrices_and_embeddings_never_on_biases_or_norms():
    model = make_model("tiny", tie_embeddings=False)  # GPT-2 shape: biases, LayerNorm gains and biases
    frozen = next(p for name, p in model.named_parameters() if name.endswith("mlp.up.weight"))
    frozen.requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept  # every trainable parameter, once; frozen ones not
    assert names[id(frozen)] not in decayed | kept
    assert any("embed" in n for n in decayed) and any(n.endswith("qkv.weight") for n in decayed)
    assert any(n.endswith("down.weight") for n in decayed) and any("head" in n or "embed" in n for n in decayed)
    assert kept and all(n.endswith(".bias") or "norm" in n for n in kept), kept
    assert any(n.endswith(".bias") for n in kept) and any("norm" in n and n.endswith("weight") for n in kept)
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed), decayed


# ---------------------------------------------------------------------------------------------- prefix tuning


def test_bake_prefixes_keeps_the_outputs_drops_the_mlp_and_records_hidden_0(tmp_path):
    from lmforge.peft import load_method_state, save_method_state

    model = apply_method(make_model("tiny-llama"), "prefix", n_tokens=3, hidden=16)
    with torch.no_grad():  # an MLP that is not at its initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 256, (2, 9))
    before = model(ids).logits
    produced = [stack.prefix() for stack in self_attention_stacks(model)]
    assert bake_prefixes(model) is model
    for stack, values in zip(self_attention_stacks(model), produced, strict=True):
        assert stack.prefix.mlp is None and stack.prefix.embedding is None
        assert isinstance(stack.prefix.prefix, torch.nn.Parameter) and stack.prefix.prefix.requires_grad
        assert torch.equal(stack.prefix.prefix, values)  # the MLP's output, stored as is
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert method_of(model) == {"method": "prefix", "options": {"n_tokens": 3, "hidden": 0, "seed": 0}}
    # What inference needs is now plain prefixes: saved and loaded onto a fresh base they give the same outputs.
    save_method_state(tmp_path / "baked", model)
    assert json.loads((tmp_path / "baked" / "method.json").read_text())["options"]["hidden"] == 0
    fresh = load_method_state(make_model("tiny-llama"), tmp_path / "baked")
    torch.testing.assert_close(fresh(ids).logits, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- generation errors


def test_an_empty_prompt_is_a_user_error():
    with pytest.raises(UserError, match="every prompt needs at least one token"):
        generate(make_model("tiny"), [[1, 2], []])


def test_a_model_that_cannot_generate_is_a_user_error():
    torch.manual_seed(0)
    encoder = MaskedLM(ModelConfig.from_preset("tiny-bert"))
    with pytest.raises(UserError, match="a MaskedLM does not generate text; use a causal or seq2seq checkpoint"):
        generate(encoder, [[1, 2, 3]])


def test_a_seq2seq_input_longer_than_the_context_is_a_user_error():
    torch.manual_seed(0)
    model = Seq2SeqLM(ModelConfig.from_preset("tiny-t5", positions="learned", context_length=16))
    assert len(generate(model, [[5] * 16], SamplingConfig(max_new_tokens=2))[0]) == 2  # exactly full: fine
    with pytest.raises(UserError, match=r"the input has 17 tokens, more than the model's .*; shorten it"):
        generate(model, [[5] * 17])


def test_fill_mask_with_a_tokenizer_without_a_mask_token_is_a_user_error():
    tokenizer = train_char(["abc def"], specials={"cls": "<cls>", "sep": "<sep>"})
    assert tokenizer.mask_id is None
    torch.manual_seed(0)
    encoder = MaskedLM(ModelConfig.from_preset("tiny-bert", vocab_size=tokenizer.vocab_size))
    with pytest.raises(UserError, match="this tokenizer has no mask token; fill-mask needs a masked-LM"):
        fill_mask(encoder, tokenizer, "abc")


# ---------------------------------------------------------------------------------------------- classification data


def test_read_labelled_reads_label_text_lines_and_jsonl(tmp_path):
    lines = tmp_path / "train.txt"
    lines.write_text("1 a fine film\n\n0 dull ,  slow\n1  x\n  0 meh  \n")
    data = read_labelled(lines)
    assert data.labels == ["1", "0", "1", "0"] and data.texts == ["a fine film", "dull ,  slow", " x", "meh"]
    records = tmp_path / "train.jsonl"
    records.write_text(json.dumps({"review": "good", "stars": 5}) + "\n\n" + json.dumps({"review": "bad", "stars": 1}))
    data = read_labelled(records, text_field="review", label_field="stars")
    assert data.texts == ["good", "bad"] and data.labels == ["5", "1"]
    with pytest.raises(UserError, match=r"train\.jsonl:1 lacks 'text' or 'label'"):
        read_labelled(records)
    (tmp_path / "bad.txt").write_text("positive\n")
    with pytest.raises(UserError, match=r"bad\.txt:1 is not '<label> <text>'"):
        read_labelled(tmp_path / "bad.txt")


def test_encode_labelled_frames_texts_and_maps_label_names_to_sorted_ids(tmp_path):
    tokenizer = train_char(["abcdefgh"], specials={"cls": "<cls>", "sep": "<sep>", "pad": "<pad>"})
    path = tmp_path / "d.txt"
    path.write_text("pos abc\nneg defgh\npos a\n")
    data = read_labelled(path)
    names = sorted(set(data.labels))
    encoded, labels = encode_labelled(data, tokenizer, names, max_length=5, source=str(path))
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    assert encoded == [[cls, *tokenizer.encode("abc"), sep], [cls, *tokenizer.encode("def"), sep],
                       [cls, *tokenizer.encode("a"), sep]]  # cut to max_length with its frame
    assert labels == [1, 0, 1]  # names sorted: neg=0, pos=1
    with pytest.raises(UserError, match=r"has label\(s\) \['pos'\] the model was not trained on"):
        encode_labelled(data, tokenizer, ["neg"], 5, "dev.txt")


def test_classification_batches_pad_on_the_right_and_keep_order_in_order():
    encoded = [[7, 1, 2, 8], [7, 3, 8], [7, 8], [7, 4, 5, 6, 8], [7, 9, 8]]
    labels = [0, 1, 0, 1, 1]
    batches = ClassificationBatches(encoded, labels, batch_size=2, pad_id=0, seed=3)
    ordered = batches.in_order()
    assert [len(b["labels"]) for b in ordered] == [2, 2, 1]
    assert ordered[0]["input_ids"].tolist() == [[7, 1, 2, 8], [7, 3, 8, 0]]
    assert ordered[0]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert ordered[1]["input_ids"].tolist() == [[7, 8, 0, 0, 0], [7, 4, 5, 6, 8]]
    assert torch.cat([b["labels"] for b in ordered]).tolist() == labels
    drawn = batches(4)
    assert torch.equal(drawn["input_ids"], batches(4)["input_ids"])  # a pure function of (seed, index)
    rows = np.random.default_rng((3, 4)).integers(0, 5, size=2)
    assert drawn["labels"].tolist() == [labels[r] for r in rows]
    for row, r in zip(drawn["input_ids"].tolist(), rows, strict=True):
        assert row[:len(encoded[r])] == encoded[r] and set(row[len(encoded[r]):]) <= {0}
    assert batches.tokens_per_batch == 2 * int(np.mean([4, 3, 2, 5, 3]))


# ---------------------------------------------------------------------------------------------- architecture pieces


@pytest.mark.parametrize("dim", [6, 8])
def test_sinusoidal_table_is_the_vaswani_formula(dim):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    length = 50
    expected = torch.zeros(length, dim, dtype=torch.float64)
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            expected[pos, 2 * i] = math.sin(angle)
            expected[pos, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(sinusoidal_table(length, dim).double(), expected, rtol=0, atol=2e-5)


def test_the_relu2_mlp_is_down_of_relu_squared_of_up():
    cfg = ModelConfig.from_preset("tiny", mlp="relu2", d_model=8, d_ff=12, n_heads=2)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    x = torch.randn(3, 5, 8)
    hidden = x @ mlp.up.weight.T + mlp.up.bias
    expected = torch.where(hidden > 0, hidden * hidden, torch.zeros_like(hidden)) @ mlp.down.weight.T + mlp.down.bias
    assert mlp.up.weight.shape == (12, 8)  # not gated: one up matrix
    torch.testing.assert_close(mlp(x), expected)
    assert (hidden < 0).any() and (hidden > 1).any()  # both the cut and the square matter here


def test_flops_per_token_of_an_encoder_written_out():
    cfg = ModelConfig.from_preset("tiny-bert", vocab_size=100, d_model=16, n_layers=3, n_heads=2, d_ff=40,
                                  context_length=32)
    # Per layer: Q, K, V, O are 16x16 each = 1024; MLP up and down 16x40 each = 1280. Head 16x100 = 1600.
    n = 3 * (4 * 16 * 16 + 2 * 16 * 40) + 16 * 100  # = 8512
    assert n == 8512
    attention = 4 * 3 * 10 * 16  # QK^T and AV: 2 matmuls x 2 FLOPs x layers x T x (heads x head_dim)
    assert flops_per_token(cfg, seq_len=10) == 3 * (2 * 8512 + attention)
    assert flops_per_token(cfg, seq_len=10, training=False) == 2 * 8512 + attention
    assert flops_per_token(cfg) == 3 * (2 * 8512 + 4 * 3 * 32 * 16)  # T defaults to the context length


def test_flops_per_token_of_an_encoder_decoder_written_out():
    cfg = ModelConfig.from_preset("tiny-t5", vocab_size=100, d_model=16, n_layers=2, n_decoder_layers=3, n_heads=2,
                                  d_head=4, d_ff=24, mlp="geglu", context_length=32)
    # Attention with 2 heads of 4: Q, K, V 16x8 each and O 8x16 = 512. Gated MLP: gate, up 16x24, down 24x16 = 1152.
    encoder = 2 * (512 + 1152)
    decoder = 3 * (512 + 512 + 1152)  # self-attention, cross-attention, MLP
    n = encoder + decoder + 16 * 100  # output head
    assert n == 3328 + 6528 + 1600
    # QK^T and AV (4 FLOPs x T x heads x head_dim each) over T = 10 in the encoder's self-attention and in every
    # decoder layer's self- and cross-attention: 2 + 2 x 3 attention terms per (source, target) token pair.
    attention = 4 * (2 + 2 * 3) * 10 * 8
    assert flops_per_token(cfg, seq_len=10) == 3 * (2 * n + attention)
    assert flops_per_token(cfg, seq_len=10, training=False) == 2 * n + attention


# ---------------------------------------------------------------------------------------------- skips on CI

SKIPPING_TESTS = '''
import pytest

def test_runs():
    assert sorted([2, 1]) == [1, 2]

def test_needs_an_extra():
    pytest.skip("peft not installed")

@pytest.mark.skip(reason="shared/data absent")
def test_needs_data():
    """Skipped before it runs."""

@pytest.mark.skip(reason="shared/data absent")
def test_needs_more_data():
    """Skipped before it runs."""
'''


def _pytest(folder: Path, fail_on_skip: bool) -> subprocess.CompletedProcess:
    """pytest on `folder` with this suite's conftest loaded as a plugin (its hooks are what is tested)."""
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_FAIL_ON_SKIP"} | {"COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if fail_on_skip:
        env["LMFORGE_FAIL_ON_SKIP"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "-p", "no:randomly", str(folder)], capture_output=True, text=True, cwd=folder, env=env,
                          timeout=120)


COLLECTION_SKIP = 'import pytest\npytest.importorskip("no_such_extra_xyz")\n\n\ndef test_it():\n    pass\n'


def test_skips_are_summed_up_locally_and_fail_the_run_on_ci(tmp_path):
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    (tmp_path / "test_extra.py").write_text(COLLECTION_SKIP)
    local = _pytest(tmp_path, fail_on_skip=False)
    assert local.returncode == 0, local.stdout
    summary = [line for line in local.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(summary) == 1 and summary[0].startswith(
        "SKIPPED 4 (allowed here; LMFORGE_FAIL_ON_SKIP=1 makes them failures): 2 x shared/data absent; "), summary
    assert "; 1 x peft not installed" in summary[0] and "; 1 x could not import 'no_such_extra_xyz'" in summary[0]
    ci = _pytest(tmp_path, fail_on_skip=True)
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 passed, 1 skipped, 2 errors" in ci.stdout, ci.stdout
    for name in ("test_needs_an_extra", "test_needs_data", "test_needs_more_data"):
        assert f"test_skipping.py::{name} - LMFORGE_FAIL_ON_SKIP=1" in ci.stdout, ci.stdout
    for reason in ("peft not installed", "shared/data absent"):
        assert f"LMFORGE_FAIL_ON_SKIP=1 makes every skip a failure; this test skipped: {reason}" in ci.stdout
    assert "SKIPPED 4 (failures on CI): 2 x shared/data absent; " in ci.stdout, ci.stdout


def test_a_module_skipped_at_collection_fails_the_run_on_ci(tmp_path):
    (tmp_path / "test_extra.py").write_text(COLLECTION_SKIP)
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")
    ci = _pytest(tmp_path, fail_on_skip=True)
    assert ci.returncode == 1, ci.stdout
    assert "1 passed, 1 skipped" in ci.stdout, ci.stdout
    assert "SKIPPED 1 (failures on CI): 1 x could not import 'no_such_extra_xyz'" in ci.stdout, ci.stdout


def test_ci_sets_fail_on_skip_only_where_the_shared_data_is(tmp_path):
    """.ci/run: LMFORGE_FAIL_ON_SKIP=1 when ../shared/data exists next to the clone, a loud line when it is
    missing; `make test` either way (a stub `make` records what it was run with)."""
    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    (clone / ".ci" / "run").write_text((repo / ".ci" / "run").read_text())
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "make").write_text('#!/bin/sh\necho "make $* FAIL_ON_SKIP=${LMFORGE_FAIL_ON_SKIP:-unset}"\n')
    (stub / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_FAIL_ON_SKIP"}
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"

    def ci() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(clone / ".ci" / "run")], capture_output=True, text=True, env=env,
                              timeout=60)

    without = ci()
    assert without.returncode == 0, without.stderr
    lines = without.stdout.splitlines()
    assert lines[-1] == "make test FAIL_ON_SKIP=unset"
    assert any("../shared/data is missing" in line and "skipped tests are ALLOWED" in line for line in lines)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    with_data = ci()
    assert with_data.returncode == 0, with_data.stderr
    assert with_data.stdout.splitlines() == ["make test FAIL_ON_SKIP=1"]
