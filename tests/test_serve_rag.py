"""POST /v1/rag/answer of `lmforge serve --index`: the same checked answer `lmforge rag ask` gives, generated
through the server's engine; bad bodies are OpenAI-shaped 400s and a bad index fails before serving."""

from __future__ import annotations

import httpx
import pytest
import torch
from test_serve import running

from lmforge.checkpoint import save
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.rag import Embedder, RagIndex, answer, find_files, update_index
from lmforge.recipes.serve import ServeConfig, build_app
from lmforge.tokenizer import train_bpe

DOCS = {
    "tides.md": "Tides rise and fall twice a day because the Moon's gravity pulls the oceans.\n",
    "bread.txt": "Bread rises when yeast ferments sugar and releases carbon dioxide into the dough.\n",
    "code.py": "def area(radius):\n    return 3.14159 * radius * radius\n",
}
QUESTION = "Why does bread rise?"


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("served-rag")
    for name, text in DOCS.items():
        (root / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "docs" / name).write_text(text)
    update_index(root / "index", find_files([str(root / "docs")]), Embedder.load(), chunk_tokens=32, overlap=4)
    tokenizer = train_bpe(iter([*DOCS.values(), QUESTION] * 3), 300)
    torch.manual_seed(0)
    save(root / "model", CausalLM(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size,
                                                          context_length=512)), tokenizer)
    return root


def test_the_route_gives_rag_asks_answer(world):
    app = build_app(ServeConfig(model=str(world / "model"), index=str(world / "index"), device="cpu"))
    model, tokenizer = load(world / "model")
    expected = answer(RagIndex.load(world / "index"), QUESTION, model, tokenizer, k=2,
                      sampling=SamplingConfig(max_new_tokens=10, temperature=0.0)).to_dict()
    with running(app) as url:
        reply = httpx.post(f"{url}/rag/answer", json={"question": QUESTION, "k": 2, "max_tokens": 10}, timeout=60)
        assert reply.status_code == 200, reply.text
        got = reply.json()
        assert got["raw_answer"] == expected["raw_answer"] and got["answer"] == expected["answer"]
        assert [p["id"] for p in got["passages"]] == [p["id"] for p in expected["passages"]]
        assert got["passages"][0]["source"].endswith("bread.txt")
        bad = httpx.post(f"{url}/rag/answer", json={"question": QUESTION, "k": 0}, timeout=60)
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        bad = httpx.post(f"{url}/rag/answer", json={"question": QUESTION, "mode": "psychic"}, timeout=60)
        assert bad.status_code == 400


def test_a_missing_index_fails_before_serving(world):
    with pytest.raises(UserError, match="nowhere"):
        build_app(ServeConfig(model=str(world / "model"), index=str(world / "nowhere"), device="cpu"))
