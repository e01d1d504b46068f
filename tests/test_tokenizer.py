import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_TEXT
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, train_bpe, train_char


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(iter([SAMPLE_TEXT, "naïve café — 東京 🙂\n"]), vocab_size=320)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_byte_level_bpe_round_trips_any_unicode_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_keeps_special_tokens(bpe):
    assert bpe.vocab_size == 320
    assert len(bpe.encode("    def __init__(self, name):")) < len(b"    def __init__(self, name):") / 2
    ids = {bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id}
    assert None not in ids and len(ids) == 4
    assert bpe.encode("x", add_bos=True, add_eos=True)[::2] == [bpe.bos_id, bpe.eos_id]


def test_save_and_load_give_the_same_ids_and_specials(bpe, tmp_path):
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(SAMPLE_TEXT[:500]) == bpe.encode(SAMPLE_TEXT[:500])
    assert (again.bos_id, again.eos_id, again.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)


def test_saved_tokenizer_loads_in_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(SAMPLE_TEXT[:300], add_special_tokens=False) == bpe.encode(SAMPLE_TEXT[:300])


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet="abc xyz\n\t!é🙂", max_size=100))
def test_char_tokenizer_round_trips_text_over_its_alphabet(text):
    tok = train_char(["abc xyz\n\t!é🙂"])
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text)


def test_char_tokenizer_orders_ids_like_nanogpt():
    tok = train_char(["hello world"])
    assert tok.vocab_size == len(set("hello world"))
    assert tok.encode(" dehlorw") == list(range(8))


def test_too_small_vocab_and_empty_corpus_are_clear_errors():
    with pytest.raises(UserError, match="too small for byte-level BPE"):
        train_bpe(iter(["abc"]), vocab_size=100)
    with pytest.raises(UserError, match="empty corpus"):
        train_char([])


def test_tokenizer_config_extras_like_the_chat_template_survive_a_round_trip(bpe, tmp_path):
    import json

    bpe.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    config.update(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", model_max_length=2048)
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path / "a")
    assert loaded.chat_template == config["chat_template"]
    loaded.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == config
