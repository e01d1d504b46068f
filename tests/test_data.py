import json

import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from lmforge.data import RandomWindows, build_shard, load_shard, read_documents, resolve_files, stdlib_files
from lmforge.errors import UserError
from lmforge.tokenizer import train_bpe, train_char


def test_stdlib_corpus_is_found_on_this_machine():
    files = stdlib_files()
    assert len(files) > 100
    assert any(f.name == "functools.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_sources_expand_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    docs = sorted(read_documents(resolve_files([str(tmp_path)])))
    assert docs == ["alpha", "beta", "delta", "gamma"]


def test_max_bytes_truncates_the_stream(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.txt").write_text("y" * 100)
    assert sum(len(d) for d in read_documents(resolve_files([str(tmp_path)]), max_bytes=150)) == 150


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: [str(p / "missing.txt")], "does not exist"),
        (lambda p: [], "no data sources given"),
        (lambda p: (p / "empty").mkdir() or [str(p / "empty")], "holds no text files"),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path, setup, message):
    with pytest.raises(UserError, match=message):
        resolve_files(setup(tmp_path))


def test_jsonl_without_the_field_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2 has no 'text' field"):
        list(read_documents([tmp_path / "d.jsonl"]))


def test_shard_round_trip_split_and_eos_separators(tmp_path):
    tok = train_bpe(iter([SAMPLE_TEXT]), vocab_size=300)
    docs = ["first document", "second one"]
    shard = build_shard(iter(docs), tok, tmp_path, val_fraction=0.25)
    assert shard.train.dtype == np.uint16
    tokens = np.concatenate([shard.train, shard.val]).tolist()
    expected = [*tok.encode(docs[0]), tok.eos_id, *tok.encode(docs[1]), tok.eos_id]
    assert tokens == expected
    assert len(shard.val) == int(len(expected) * 0.25)
    reloaded = load_shard(tmp_path)
    assert reloaded.train.tolist() == shard.train.tolist()


def test_empty_corpus_is_a_clear_error(tmp_path):
    tok = train_char(["abc"])
    with pytest.raises(UserError, match="corpus is empty"):
        build_shard(iter([]), tok, tmp_path)


def test_random_windows_are_shifted_deterministic_and_in_range():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = RandomWindows(tokens, batch_size=4, context=16, seed=3)
    batch = windows(7)
    assert batch["input_ids"].shape == (4, 16)
    assert (batch["labels"] == batch["input_ids"] + 1).all()  # labels are the next tokens
    assert (windows(7)["input_ids"] == batch["input_ids"]).all()
    assert not (windows(8)["input_ids"] == batch["input_ids"]).all()
    assert int(batch["labels"].max()) < 1000


def test_corpus_shorter_than_the_context_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than context_length"):
        RandomWindows(np.arange(10, dtype=np.uint16), batch_size=2, context=64)
