import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_TEXT, SHARED_DATA, shared_file_or_fallback
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, train_bpe, train_char, train_unigram, train_wordpiece


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


# -- WordPiece (BERT) and Unigram (T5) -----------------------------------------------------------

SST2 = SHARED_DATA / "sentiment" / "sst2.train.txt"
# Every ASCII letter both starting a word and inside one, so no test word falls back to an unknown token.
ALPHABET_LINES = [" ".join(string.ascii_letters), string.ascii_letters, string.ascii_letters[::-1], string.printable]
NUM_SENTINELS = 20


def _corpus() -> list[str]:
    if shared_file_or_fallback(SST2):  # "label text" lines of real English
        lines = [line.split(" ", 1)[-1] for line in SST2.read_text().splitlines()[:2000]]
    else:
        lines = [*SAMPLE_TEXT.splitlines(), "the quick brown fox jumps over the lazy dog."] * 5
    return lines + ALPHABET_LINES


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return train_wordpiece(_corpus(), vocab_size=1000)


@pytest.fixture(scope="module")
def unigram() -> Tokenizer:
    return train_unigram(_corpus(), vocab_size=1000, num_sentinels=NUM_SENTINELS)


def _sentences(alphabet: str):
    words = st.text(alphabet=alphabet, min_size=1, max_size=12)
    return st.lists(words, min_size=1, max_size=12).map(" ".join)


@settings(max_examples=100, deadline=None)
@given(text=_sentences(string.ascii_letters), end=st.sampled_from(["", ".", "!", "?", ","]))
def test_wordpiece_round_trips_simple_sentences_to_their_lowercased_form(wordpiece, text, end):
    assert wordpiece.decode(wordpiece.encode(text + end)) == (text + end).lower()


@settings(max_examples=100, deadline=None)
@given(text=_sentences(string.ascii_letters + string.digits + ".,!?'-:;()"))
def test_unigram_round_trips_ascii_text_with_single_spaces(unigram, text):
    assert unigram.decode(unigram.encode(text)) == text


def test_wordpiece_has_berts_special_tokens_with_pad_at_zero(wordpiece):
    roles = (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id)
    assert roles == (0, 1, 2, 3, 4)
    assert (wordpiece.bos_id, wordpiece.eos_id) == (None, None)
    assert wordpiece.special_ids == [0, 1, 2, 3, 4]
    assert wordpiece.sentinel_ids == []
    assert wordpiece.vocab_size <= 1000
    assert wordpiece.encode("[MASK]") == [wordpiece.mask_id]  # specials match as written, despite lowercasing
    assert not set(wordpiece.encode("hello world")) & set(wordpiece.special_ids)  # encode adds nothing


def test_unigram_has_t5s_special_tokens_and_sentinels(unigram):
    assert (unigram.pad_id, unigram.eos_id, unigram.unk_id) == (0, 1, 2)
    assert (unigram.bos_id, unigram.cls_id, unigram.sep_id, unigram.mask_id) == (None, None, None, None)
    sentinels = unigram.sentinel_ids
    assert len(sentinels) == len(set(sentinels)) == NUM_SENTINELS
    assert sentinels[0] == unigram.vocab_size - 1  # T5's layout: <extra_id_0> is the last id
    assert unigram.special_ids == sorted([0, 1, 2, *sentinels])
    for i, sentinel in enumerate(sentinels):
        assert unigram.encode(f"<extra_id_{i}>") == [sentinel]
        assert unigram.decode([sentinel]) == f"<extra_id_{i}>"


def test_sentinels_never_split_and_skip_special_tokens_drops_them(unigram):
    ids = unigram.encode("the<extra_id_3>movie <extra_id_11> was fine")
    s3, s11 = unigram.sentinel_ids[3], unigram.sentinel_ids[11]
    assert ids.count(s3) == ids.count(s11) == 1
    assert unigram.decode(ids) == "the<extra_id_3>movie <extra_id_11> was fine"
    assert "extra_id" not in unigram.decode(ids, skip_special_tokens=True)
    assert unigram.decode(unigram.encode("the<extra_id_3>movie"), skip_special_tokens=True) == "themovie"


def test_encode_for_encoder_frames_and_truncates(wordpiece, unigram, bpe):
    raw = wordpiece.encode("a stirring, funny and finally transporting film")
    cls, sep = wordpiece.cls_id, wordpiece.sep_id
    assert wordpiece.encode_for_encoder("a stirring, funny and finally transporting film") == [cls, *raw, sep]
    cut = wordpiece.encode_for_encoder("a stirring, funny and finally transporting film", max_length=5)
    assert cut == [cls, *raw[:3], sep]
    assert wordpiece.encode_for_encoder("a stirring", max_length=2) == [cls, sep]
    assert wordpiece.encode_for_encoder("hi", max_length=50) == [cls, *wordpiece.encode("hi"), sep]
    # Without [CLS]/[SEP]: <s>/</s> where they exist (T5 has only </s>), else the raw ids.
    assert unigram.encode_for_encoder("a film") == [*unigram.encode("a film"), unigram.eos_id]
    assert bpe.encode_for_encoder("x", max_length=3) == [bpe.bos_id, *bpe.encode("x"), bpe.eos_id]
    assert train_char(["abc"]).encode_for_encoder("cab", max_length=2) == [2, 0]
    with pytest.raises(UserError, match="max_length=1 cannot hold the 2 framing"):
        wordpiece.encode_for_encoder("a stirring", max_length=1)


def test_bpe_reports_its_special_ids_and_no_sentinels(bpe):
    assert bpe.special_ids == sorted([bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id])
    assert bpe.sentinel_ids == []
    assert (bpe.cls_id, bpe.sep_id, bpe.mask_id) == (None, None, None)


@pytest.mark.parametrize("name", ["wordpiece", "unigram"])
def test_wordpiece_and_unigram_save_and_load_with_the_same_ids_and_roles(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "A stirring, funny film <extra_id_1> and [MASK] more."
    assert again.encode(text) == tok.encode(text)
    assert again.specials == tok.specials
    assert again.special_ids == tok.special_ids and again.sentinel_ids == tok.sentinel_ids
    assert again.encode_for_encoder(text, max_length=8) == tok.encode_for_encoder(text, max_length=8)


@pytest.mark.parametrize("name", ["wordpiece", "unigram"])
def test_wordpiece_and_unigram_load_in_transformers_with_the_same_ids(name, request, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    text = "A stirring, funny film <extra_id_1> and [MASK] more.\nThe end."
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for role in ("pad", "unk", "eos", "cls", "sep", "mask"):
        assert getattr(auto, f"{role}_token_id") == getattr(tok, f"{role}_id")


def test_wordpiece_and_unigram_errors_are_clear():
    with pytest.raises(UserError, match="too small for WordPiece"):
        train_wordpiece(["abc"], vocab_size=5)
    with pytest.raises(UserError, match="empty corpus"):
        train_wordpiece([], vocab_size=100)
    with pytest.raises(UserError, match="cannot hold 3 special tokens, 100 sentinels"):
        train_unigram(["abc"], vocab_size=100)
    with pytest.raises(UserError, match="fewer than the corpus has characters"):
        train_unigram([string.ascii_letters], vocab_size=30, num_sentinels=10)
    with pytest.raises(UserError, match="empty corpus"):
        train_unigram([], vocab_size=100, num_sentinels=0)
    with pytest.raises(UserError, match="num_sentinels=-1"):
        train_unigram(["abc"], num_sentinels=-1)
    with pytest.raises(UserError, match="unknown special-token role 'start'"):
        Tokenizer(train_char(["ab"]).backend, {"start": "a"})
