"""Fill-in-the-middle: the transformation round-trips, rates 0 and 1 do what they say, each part is tokenised on its
own, a tiny FIM-trained model infills a planted pattern (Python API and `lmforge generate --prompt ...<FILL>...`),
the HF export keeps the FIM tokens, and bad input gets a one-line error."""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, make_model, run_cli
from lmforge.checkpoint import save
from lmforge.data.fim import (
    FIM_TOKENS,
    FimEncoder,
    add_fim_tokens,
    choose_fim,
    fim_token_ids,
    infill_prompt,
    restore_document,
)
from lmforge.data.shards import load_shard
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, infill
from lmforge.recipes.convert import ConvertConfig, convert
from lmforge.recipes.generate import GenerateConfig, run_generate
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe, train_char
from lmforge.train import TrainConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MODES = ("psm", "spm", "psm+spm")


@functools.cache
def bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE with the FIM tokens: it encodes any Unicode string, so hypothesis may draw anything."""
    text = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20 + "héllo wörld ✓ 🙂 ünïcödé " * 10
    tokenizer = train_bpe(iter([text]), 300, DEFAULT_SPECIALS)
    add_fim_tokens(tokenizer, "psm")
    return tokenizer


# -- the transformation ---------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60), seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(MODES))
def test_the_transformation_round_trips_in_every_mode(text, seed, mode):
    tokenizer = bpe_tokenizer()
    pre, suf, mid = fim_token_ids(tokenizer)
    (ids,) = FimEncoder(tokenizer, 1.0, mode, seed)([text])
    assert restore_document(ids, tokenizer) == text
    assert [ids.count(t) for t in (pre, suf, mid)] == [1, 1, 1]
    if mode == "spm":  # the paper's SPM variant: <pre> <suf> suffix <mid> prefix middle
        assert ids[:2] == [pre, suf]
    if mode == "psm":
        assert ids[0] == pre and ids.index(suf) < ids.index(mid)
    split, _ = choose_fim(text, np.random.default_rng((seed, 0)), 1.0, mode)
    assert split.prefix + split.middle + split.suffix == text


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_each_part_is_tokenised_on_its_own_and_arranged_as_the_paper_does(mode):
    tokenizer = bpe_tokenizer()
    pre, suf, mid = fim_token_ids(tokenizer)
    text = "def f(x):\n    return x + 1\n" * 3
    (ids,) = FimEncoder(tokenizer, 1.0, mode, seed=7)([text])
    split, chosen = choose_fim(text, np.random.default_rng((7, 0)), 1.0, mode)
    assert chosen == mode
    p, m, s = (tokenizer.encode(part) for part in (split.prefix, split.middle, split.suffix))
    assert ids == ([pre, *p, suf, *s, mid, *m] if mode == "psm" else [pre, suf, *s, mid, *p, *m])


def test_rate_zero_leaves_documents_alone_rate_one_transforms_all_and_half_is_about_half():
    tokenizer = bpe_tokenizer()
    rng = random.Random(0)
    docs = ["".join(rng.choice("abc def():\n") for _ in range(rng.randrange(1, 40))) for _ in range(400)]
    pre = fim_token_ids(tokenizer)[0]
    assert FimEncoder(tokenizer, 0.0, "psm")(docs) == tokenizer.encode_batch(docs)
    assert all(ids[0] == pre for ids in FimEncoder(tokenizer, 1.0, "psm+spm")(docs))
    half = FimEncoder(tokenizer, 0.5, "psm", seed=3)(docs)
    share = sum(ids[0] == pre for ids in half) / len(docs)
    assert 0.43 < share < 0.57, share
    assert [restore_document(ids, tokenizer) for ids in half] == docs


def test_documents_depend_on_seed_and_index_not_on_batching():
    tokenizer = bpe_tokenizer()
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(30)]
    whole = FimEncoder(tokenizer, 0.5, "psm+spm", seed=1)(docs)
    encoder = FimEncoder(tokenizer, 0.5, "psm+spm", seed=1)
    pieces = encoder(docs[:7]) + encoder(docs[7:8]) + encoder(docs[8:])
    assert pieces == whole
    assert FimEncoder(tokenizer, 0.5, "psm+spm", seed=2)(docs) != whole


def test_fim_tokens_are_single_special_tokens_and_the_mode_is_recorded(tmp_path):
    tokenizer = train_char(["abc"])  # no EOS: a FIM run adds one, the middle has to end
    add_fim_tokens(tokenizer, "spm")
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    ids = fim_token_ids(loaded)
    assert loaded.eos_id is not None and set(ids) <= set(loaded.special_ids)
    assert [loaded.encode(token) for token in FIM_TOKENS] == [[i] for i in ids]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["fim_mode"] == "spm"
    pre, suf, mid = ids  # an SPM prompt ends with the prefix: the middle continues it
    assert infill_prompt(loaded, "ab", "c") == [pre, suf, *loaded.encode("c"), mid, *loaded.encode("ab")]
    assert infill_prompt(loaded, "ab", "c", mode="psm") == [pre, *loaded.encode("ab"), suf, *loaded.encode("c"), mid]


# -- a tiny FIM-trained model -----------------------------------------------------------------------
def _alphabet_cases(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) runs of the alphabet: the middle is fully determined by the two sides."""
    rng, cases = random.Random(seed), []
    for _ in range(count):
        i = rng.randrange(0, 18)
        a = rng.randrange(i + 1, i + 4)
        b = rng.randrange(a + 1, a + 4)
        cases.append((ALPHABET[i:a], ALPHABET[a:b], ALPHABET[b:rng.randrange(b + 1, min(b + 5, 27))]))
    return cases


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory, one_thread):
    """300 steps of a 0.1M-parameter char model on 2,000 alphabet runs, every one rearranged (PSM)."""
    folder = tmp_path_factory.mktemp("fim")
    rng = random.Random(0)
    corpus = folder / "alphabet.jsonl"
    with corpus.open("w") as f:
        for _ in range(2000):
            i = rng.randrange(0, 20)
            f.write(json.dumps({"text": ALPHABET[i:rng.randrange(i + 6, min(i + 15, 27))]}) + "\n")
    torch.manual_seed(0)
    return pretrain(PretrainConfig(
        out_dir=str(folder / "run"), data=DataConfig(sources=[str(corpus)]), tokenizer=TokenizerConfig(kind="char"),
        model=dict(preset="tiny", context_length=32, positions="rope"),
        train=TrainConfig(steps=300, batch_size=32, lr=1e-2, warmup_steps=10, eval_every=0, seed=0),
        objective="fim", fim_rate=1.0, fim_mode="psm"))


def test_a_tiny_fim_model_infills_a_planted_pattern(fim_run):
    greedy = SamplingConfig(greedy=True, max_new_tokens=12)
    cases = _alphabet_cases(40, seed=1)
    right = sum(infill(fim_run.model, fim_run.tokenizer, p, s, greedy) == m for p, m, s in cases)
    assert right / len(cases) >= 0.75, right  # measured: 36/40 (a 26-way guess per letter, plus where to stop)
    config = json.loads((fim_run.out_dir / "checkpoint" / "tokenizer_config.json").read_text())
    assert config["fim_mode"] == "psm"


def test_the_pretrain_shard_holds_every_document_rearranged_and_restorable(fim_run):
    shard = load_shard(fim_run.out_dir / "data")
    tokens = np.concatenate([shard.train, shard.val]).tolist()
    eos, pre = fim_run.tokenizer.eos_id, fim_token_ids(fim_run.tokenizer)[0]
    documents, start = [], 0
    for end in (i for i, t in enumerate(tokens) if t == eos):
        documents.append(tokens[start:end])
        start = end + 1
    corpus = [json.loads(line)["text"] for line in (fim_run.out_dir.parent / "alphabet.jsonl").open()]
    assert len(documents) == shard.meta["documents"] == len(corpus)
    assert all(doc[0] == pre for doc in documents)  # fim_rate=1.0
    assert [restore_document(doc, fim_run.tokenizer) for doc in documents] == corpus


def test_generate_fills_the_one_fill_marker_through_the_cli(fim_run):
    checkpoint = str(fim_run.out_dir / "checkpoint")
    greedy = SamplingConfig(greedy=True, max_new_tokens=12)
    middle = infill(fim_run.model, fim_run.tokenizer, "abcd", "hijk", greedy)
    done = run_cli("generate", "--model", checkpoint, "--prompt", "abcd<FILL>hijk", "--greedy",
                   "--max_new_tokens", "12")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"abcd{middle}hijk"
    with pytest.raises(UserError, match="the prompt has 2 <FILL> markers; an infill fills exactly one"):
        run_generate(GenerateConfig(model=checkpoint, prompt=["ab<FILL>cd<FILL>"], greedy=True))


def test_hf_export_keeps_the_fim_tokens(fim_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    # A Llama-shaped model (GPT-2 and Llama are the exportable shapes) with the FIM run's tokenizer.
    save(tmp_path / "model", make_model("tiny-llama", vocab_size=fim_run.tokenizer.vocab_size), fim_run.tokenizer)
    convert(ConvertConfig(src=str(tmp_path / "model"), dst=str(tmp_path / "hf")))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = fim_token_ids(fim_run.tokenizer)
    for token, token_id in zip(FIM_TOKENS, ids, strict=True):
        assert hf.encode(token, add_special_tokens=False) == [token_id]
        assert token_id in hf.all_special_ids
    text = f"{FIM_TOKENS[0]}abc{FIM_TOKENS[1]}ghi{FIM_TOKENS[2]}"
    assert hf.encode(text, add_special_tokens=False) == infill_prompt(fim_run.tokenizer, "abc", "ghi")


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    (dict(fim_rate=1.5), "fim_rate=1.5 must be in [0, 1]"),
    (dict(fim_rate=-0.1), "fim_rate=-0.1 must be in [0, 1]"),
    (dict(fim_mode="pms"), "fim_mode='pms' is not one of"),
    (dict(family="masked"), "--objective fim trains a causal model"),
])
def test_bad_fim_options_are_refused(options, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PretrainConfig(objective="fim", **options)


def test_bad_fim_options_on_the_cli_are_one_line_errors(tmp_path):
    done = run_cli("pretrain", "--objective", "fim", "--fim_rate", "2", "--out_dir", str(tmp_path / "run"))
    assert_one_line_error(done.stderr, "fim_rate=2.0 must be in [0, 1]", done.returncode)


def test_infilling_with_a_model_not_trained_for_it_is_a_one_line_error(tmp_path):
    save(tmp_path / "plain", make_model("tiny", vocab_size=40), train_char(["def f(x): return x\n"]))
    with pytest.raises(UserError, match="no <fim_prefix>"):
        infill(make_model("tiny", vocab_size=40), train_char(["abc"]), "a", "c")
    done = run_cli("generate", "--model", str(tmp_path / "plain"), "--prompt", "def f(<FILL>): return x", "--greedy")
    assert_one_line_error(done.stderr, "not trained to fill in the middle", done.returncode)
