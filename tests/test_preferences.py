"""Preference data (pairs, hh-rlhf transcripts, rankings, chat templates) and completion log-probs."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import SHARED_DATA, make_model
from lmforge.align.logprobs import completion_logprobs, pack_pairs, scoring_mode, sequence_logprob
from lmforge.data.preferences import (
    PreferencePair,
    apply_chat_template,
    hh_first_human_turns,
    ranking_to_pairs,
    read_hh_rlhf,
    read_pairs,
    read_preferences,
    read_rankings,
    write_pairs,
)
from lmforge.errors import UserError
from lmforge.tokenizer import train_char

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
HH = SHARED_DATA / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"


def test_ranking_gives_every_ordered_pair_in_documented_order():
    pairs = ranking_to_pairs("p", ["a", "b", "c", "d"])
    assert len(pairs) == 4 * 3 // 2
    assert [(x.chosen, x.rejected) for x in pairs] == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert {x.prompt for x in pairs} == {"p"}
    with pytest.raises(UserError, match="at least 2"):
        ranking_to_pairs("p", ["a"])
    with pytest.raises(UserError, match="twice"):
        ranking_to_pairs("p", ["a", "a"])


def test_rankings_from_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "q", "ranking": ["x", "y", "z"]}) + "\n\n"
                    + json.dumps({"prompt": "r", "ranking": ["u", "v"]}) + "\n")
    pairs = read_rankings(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("q", "x", "y"), ("q", "x", "z"), ("q", "y", "z"), ("r", "u", "v")]
    path.write_text(json.dumps({"prompt": "q", "ranking": ["x", ""]}) + "\n")
    with pytest.raises(UserError, match=r"r.jsonl:1: the 'ranking' completion is empty"):
        read_rankings(path)


def test_pairs_round_trip_and_one_line_errors(tmp_path):
    pairs = [PreferencePair("Q: é?", "yes", "no"), PreferencePair("", "a\nb", "c")]
    path = tmp_path / "p.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    assert read_preferences(path) == pairs
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2 has no 'rejected' field") as err:
        read_pairs(path)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"prompt": "q", "chosen": "  ", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: the 'chosen' completion is empty"):
        read_pairs(path)
    path.write_text(json.dumps({"q": "q", "good": "a", "bad": "b"}) + "\n")
    assert read_pairs(path, "q", "good", "bad") == [PreferencePair("q", "a", "b")]


def test_hh_transcripts_split_into_shared_prompt_and_last_answers(tmp_path):
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me?\n\nAssistant:"
    records = [
        {"chosen": shared + " Sure.", "rejected": shared + " No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": shared + " ok", "rejected": shared + " "},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    pairs, skipped = read_hh_rlhf(path)
    assert pairs == [PreferencePair(shared, " Sure.", " No.")]
    assert skipped == 2
    assert hh_first_human_turns(path) == ["hi", "a", "hi"]


@pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/data/preference")
def test_hh_rlhf_harmless_file():
    pairs, skipped = read_hh_rlhf(HH)
    assert len(pairs) + skipped == 2312
    assert skipped < 20
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)



def test_chat_template_wraps_the_prompt_only_where_there_is_one():
    pair = PreferencePair("Why?", "Because.", "No.")
    tokenizer = train_char(["abc"])
    assert apply_chat_template(tokenizer, pair) is pair
    tokenizer.config["chat_template"] = TEMPLATE
    templated = apply_chat_template(tokenizer, pair)
    assert templated == PreferencePair("<|user|>Why?<|assistant|>", "Because.", "No.")


# -- log-probs ---------------------------------------------------------------------------------------------------

def _reference_logprobs(model, prompt, completion):
    """Row by row, unpadded, full log_softmax: the plain definition."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    return picked[len(prompt) - 1:]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_left_and_right_padding_give_the_unpadded_logprobs(preset):
    model = make_model(preset)
    prompts, completions = [[5, 6, 7, 8, 9], [3], [4, 4]], [[10, 11], [12, 13, 14, 15, 16], [17]]
    expected = [_reference_logprobs(model, p, c) for p, c in zip(prompts, completions, strict=True)]
    for side in ("left", "right"):
        ids, mask, comp = pack_pairs(prompts, completions, pad_id=0, side=side)
        out = completion_logprobs(model, ids, mask, comp)
        assert out.shape == (3, ids.shape[1] - 1) and out.dtype == torch.float32
        for row, want in enumerate(expected):
            got = out[row][comp[row, 1:].bool()]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert (out[row][~comp[row, 1:].bool()] == 0).all()  # prompt and padding carry nothing
        torch.testing.assert_close(sequence_logprob(model, ids, mask, comp), torch.stack([w.sum() for w in expected]),
                                   atol=1e-5, rtol=1e-5)


def test_eos_equal_to_pad_stays_in_the_completion_mask():
    eos = pad = 2
    ids, mask, comp = pack_pairs([[5, 6], [7, 8, 9]], [[10, eos], [11, 12, eos]], pad_id=pad, side="right")
    assert comp.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    model = make_model()
    out = completion_logprobs(model, ids, mask, comp)
    assert out[0, 2] != 0 and out[1, 4] != 0  # the EOS tokens are scored
    assert (out[0, 3:] == 0).all()  # the pads after it (same id) are not


def test_scoring_mode_turns_dropout_off_and_restores_the_mode():
    model = make_model(dropout=0.5).train()
    ids, mask, comp = pack_pairs([[5, 6, 7]], [[8, 9, 10]], pad_id=0)
    with scoring_mode(model):
        assert not model.training
        first = sequence_logprob(model, ids, mask, comp)
        second = sequence_logprob(model, ids, mask, comp)
    assert torch.equal(first, second)
    assert model.training
    assert not torch.equal(sequence_logprob(model, ids, mask, comp), sequence_logprob(model, ids, mask, comp))


def test_pack_pairs_errors_and_truncation():
    with pytest.raises(UserError, match="row 2 has an empty completion"):
        pack_pairs([[1], [2]], [[3], []], pad_id=0)
    with pytest.raises(UserError, match="padding side"):
        pack_pairs([[1]], [[3]], pad_id=0, side="middle")
    ids, _, comp = pack_pairs([list(range(1, 11))], [list(range(20, 30))], pad_id=0, max_length=8)
    assert ids.tolist() == [[7, 8, 9, 10, 20, 21, 22, 23]]  # the prompt's end and the completion's start
    assert comp.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_seq2seq_is_a_one_line_error():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model
    model = build_model(ModelConfig.from_preset("tiny-t5"))
    ids, mask, comp = pack_pairs([[5]], [[6]], pad_id=0)
    with pytest.raises(UserError, match="causal language model; this is a seq2seq model"):
        completion_logprobs(model, ids, mask, comp)
