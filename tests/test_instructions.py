"""Instruction data: formats, layouts, chat template, completion-only loss, packing, task mixing."""

import json

import pytest
import torch

from conftest import SHARED_DATA, make_model
from lmforge.data.instructions import (
    DatasetSpec,
    Encoded,
    Example,
    InstructionBatches,
    causal_rows,
    encode_examples,
    layout,
    read_examples,
    render_chat,
)
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, train_bpe

DIALOGSUM = SHARED_DATA / "dialogsum" / "dialogsum.dev.jsonl"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(iter(["Summarize the dialogue: hello there, answer and response " * 50]), vocab_size=300)


def test_three_formats_become_prompt_completion_pairs(tmp_path):
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add.", "input": "2 2", "output": "4"},
                                                      {"instruction": "Greet.", "input": "", "output": "hi"}]))
    (tmp_path / "dialog.jsonl").write_text(json.dumps({"dialogue": "A: hi\nB: yo", "summary": "greeting"}) + "\n")
    assert read_examples(DatasetSpec(str(tmp_path / "pc.jsonl"))) == [Example("2+2=", "4")]
    alpaca = read_examples(DatasetSpec(str(tmp_path / "alpaca.json")))
    assert alpaca[0] == Example("### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n", "4")
    assert alpaca[1].prompt == "### Instruction:\nGreet.\n\n### Response:\n"
    assert read_examples(DatasetSpec(str(tmp_path / "alpaca.json")), "flan")[0].prompt == "Add.\n\n2 2\n\nAnswer: "
    mapped = read_examples(DatasetSpec(str(tmp_path / "dialog.jsonl"), prompt_template="Summarize:\n{dialogue}\n",
                                       completion_field="summary"))
    assert mapped == [Example("Summarize:\nA: hi\nB: yo\n", "greeting")]


def test_dialogsum_maps_through_a_template():
    if not DIALOGSUM.is_file():
        pytest.skip("shared data absent")
    spec = DatasetSpec(str(DIALOGSUM), prompt_template="{dialogue}\nSummary: ", completion_field="summary", limit=5)
    examples = read_examples(spec)
    assert len(examples) == 5 and examples[0].prompt.startswith("#Person1#")


def test_unmappable_records_and_bad_templates_are_clear_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match="give a prompt_template"):
        read_examples(DatasetSpec(str(tmp_path / "x.jsonl")))
    with pytest.raises(UserError, match=r"no field\(s\) \['body'\]"):
        read_examples(DatasetSpec(str(tmp_path / "x.jsonl"), prompt_template="{body}", completion_field="answer"))
    with pytest.raises(UserError, match="template='nope'"):
        layout("x", "", "nope")


def test_loss_covers_only_completion_tokens(tokenizer):
    (item,) = encode_examples([Example("Summarize the dialogue: hello", " answer")], tokenizer, 64)
    (ids, labels), = causal_rows([item])
    assert labels[: len(item.prompt) - 1] == [-100] * (len(item.prompt) - 1)
    assert labels[len(item.prompt) - 1:] == item.completion and item.completion[-1] == tokenizer.eos_id
    # The loss is the mean NLL of the completion tokens alone, whatever the prompt positions' targets were.
    model = make_model("tiny", vocab_size=tokenizer.vocab_size)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    loss = model(x, labels=y).loss
    logp = torch.log_softmax(model(x).logits[0], -1)
    start = len(item.prompt) - 1
    by_hand = -torch.stack([logp[start + i, t] for i, t in enumerate(item.completion)]).mean()
    torch.testing.assert_close(loss, by_hand)


def test_over_long_examples_keep_the_completion(tokenizer):
    (item,) = encode_examples([Example("hello " * 50, " answer")], tokenizer, 16)
    assert len(item.prompt) + len(item.completion) == 16 and item.completion[-1] == tokenizer.eos_id


def test_chat_template_renders_one_user_turn(tokenizer):
    tokenizer.config["chat_template"] = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render_chat(tokenizer, "hi") == "<|user|>hi</s><|assistant|>"
    del tokenizer.config["chat_template"]
    with pytest.raises(UserError, match="needs a tokenizer with a chat_template"):
        render_chat(tokenizer, "hi")


def test_mixing_follows_weights_and_is_reproducible():
    a = [Encoded([1, 2], [3, 4])] * 4
    b = [Encoded([5, 6, 7], [8])] * 4
    batches = InstructionBatches([a, b], [3.0, 1.0], batch_size=400, pad_id=0, seed=1)
    first = batches(0)
    assert torch.equal(first["input_ids"], batches(0)["input_ids"])
    share_a = (first["input_ids"][:, 0] == 1).float().mean().item()
    assert abs(share_a - 0.75) < 0.07
    assert set(first) == {"input_ids", "labels"}


def test_packing_fills_rows_and_keeps_label_masks():
    items = [Encoded([1, 2, 3], [4, 5]), Encoded([6, 7], [8, 9, 10])]
    batches = InstructionBatches([items], [1.0], batch_size=2, pad_id=0, pack_length=4)
    assert batches.rows[0] == [([1, 2, 3, 4], [-100, -100, 4, 5]), ([6, 7, 8, 9], [-100, 8, 9, 10])]


def test_seq2seq_batches_put_the_prompt_in_the_encoder():
    items = [Encoded([5, 6], [7, 1])]
    batch = InstructionBatches([items], [1.0], batch_size=1, pad_id=0, family="seq2seq", eos_id=1)(0)
    assert batch["input_ids"].tolist() == [[5, 6, 1]] and batch["labels"].tolist() == [[7, 1]]
