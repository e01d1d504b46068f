"""Answering from retrieved passages: a prompt with numbered sources [1]..[n] and an instruction to cite them,
generation, then a check of the citations.

The prompt must leave the model room for its answer (max_new_tokens, for a decoder-only model): the
lowest-ranked sources are dropped until it fits (the answer lists them as trimmed), and a question that does
not fit even without sources is a UserError. Models with a chat template get the prompt as one user turn.
After generation every [n] (or [n, m]) is checked: numbers that were not among the sources given ([0], [7] of
4) are removed from the text and reported; the answer lists the valid sources it cites, with file:line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate_text
from lmforge.models import CausalLM, Model, Seq2SeqLM
from lmforge.rag.index import RagIndex
from lmforge.rag.retrieve import Passage, search
from lmforge.tokenizer import Tokenizer

INSTRUCTION = ("Answer the question using only the numbered sources below. Cite every source you use by its "
               "number in square brackets, like [1].")
CITATION = re.compile(r"\s*\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")


@dataclass
class Citation:
    number: int
    source: str
    start_line: int
    end_line: int
    where: str


@dataclass
class RagAnswer:
    """The answer after the citation check, the sources it cites, the citations removed (as numbers), the
    passages given to the model (numbered from 1, with scores) and those trimmed to fit the context."""

    question: str
    answer: str
    cited: list[Citation]
    removed: list[int]
    passages: list[dict[str, Any]]
    trimmed: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "hybrid"
    raw_answer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_prompt(question: str, passages: list[Passage], tokenizer: Tokenizer) -> str:
    sources = "".join(f"[{n}] {p.chunk.where}\n{p.chunk.text.strip()}\n\n" for n, p in enumerate(passages, start=1))
    sources = sources or "(none)\n\n"
    body = f"{INSTRUCTION}\n\nSources:\n{sources}Question: {question.strip()}"
    if tokenizer.chat_template:
        return tokenizer.render_chat([{"role": "user", "content": body}], add_generation_prompt=True)
    return f"{body}\nAnswer:"


def prompt_room(model: Model, sampling: SamplingConfig) -> tuple[int, str]:
    """Prompt tokens the model can take while leaving room for the answer, and how to say so."""
    if isinstance(model, CausalLM):
        return (model.token_room - sampling.max_new_tokens,
                f"the model's {model.room_text} less max_new_tokens={sampling.max_new_tokens}")
    if isinstance(model, Seq2SeqLM):
        return model.token_room, f"the model's input room ({model.room_text})"
    raise UserError(f"answering needs a causal or seq2seq model; this is a {type(model).__name__}")


def fitting_prompt(question: str, passages: list[Passage], model: Model, tokenizer: Tokenizer,
                   sampling: SamplingConfig) -> tuple[str, int]:
    """The prompt with as many of the best passages as fit, and how many fit."""
    room, what = prompt_room(model, sampling)
    used = len(passages)
    while True:
        prompt = build_prompt(question, passages[:used], tokenizer)
        size = len(tokenizer.encode(prompt))
        if size <= room:
            return prompt, used
        if used == 0:
            raise UserError(f"the question's prompt alone is {size} tokens, more than {what} ({room}); shorten "
                            "the question, lower --max_new_tokens or use a model with a longer context")
        used -= 1


def check_citations(text: str, sources: int) -> tuple[str, list[int], list[int]]:
    """(text without invalid citations, valid numbers cited in order of first use, invalid numbers removed)."""
    cited: list[int] = []
    removed: list[int] = []

    def fix(match: re.Match[str]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        valid = [n for n in numbers if 1 <= n <= sources]
        removed.extend(n for n in numbers if not 1 <= n <= sources)
        cited.extend(n for n in valid if n not in cited)
        if not valid:
            return ""
        if len(valid) == len(numbers):
            return match.group(0)
        lead = match.group(0)[:len(match.group(0)) - len(match.group(0).lstrip())]
        return f"{lead}[{', '.join(map(str, valid))}]"

    return CITATION.sub(fix, text).strip(), cited, removed


def answer(index: RagIndex, question: str, model: Model, tokenizer: Tokenizer, k: int = 4,
           sampling: SamplingConfig | None = None, mode: str = "hybrid",
           complete: Callable[[str], str] | None = None) -> RagAnswer:
    """Retrieve k passages, ask the model with them as numbered sources, check its citations. `complete(prompt)`
    generates instead of `generate_text` (the server passes its batching engine)."""
    sampling = sampling or SamplingConfig(max_new_tokens=128, temperature=0.0)
    passages = search(index, question, k, mode)
    prompt, used = fitting_prompt(question, passages, model, tokenizer, sampling)
    raw = complete(prompt) if complete else generate_text(model, tokenizer, [prompt], sampling)[0]
    text, cited, removed = check_citations(raw, used)
    given = passages[:used]
    return RagAnswer(
        question=question, answer=text, removed=removed, mode=mode, raw_answer=raw,
        cited=[Citation(n, given[n - 1].chunk.source, given[n - 1].chunk.start_line, given[n - 1].chunk.end_line,
                        given[n - 1].chunk.where) for n in cited],
        passages=[{"number": n, **p.to_dict()} for n, p in enumerate(given, start=1)],
        trimmed=[p.to_dict() for p in passages[used:]])
