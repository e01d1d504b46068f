"""Preference data: (prompt, chosen, rejected) triples for reward models, DPO and RLAIF.

Three sources become the same `PreferencePair` list:
- JSONL pairs, one object per line with prompt/chosen/rejected fields (`read_pairs`, written by `write_pairs`);
- Anthropic hh-rlhf transcripts, whose "chosen" and "rejected" are whole dialogues that share every turn but the
  last assistant answer (`read_hh_rlhf`);
- rankings of K completions of one prompt, best first, which give K(K-1)/2 pairs (`ranking_to_pairs`,
  `read_rankings`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.data.corpus import jsonl_records, jsonl_values
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    return value


def _completion(value: Any, where: str, name: str) -> str:
    text = _text(value, where, name)
    if not text.strip():
        raise UserError(f"{where}: the '{name}' completion is empty; give every pair a non-empty chosen and "
                        "rejected completion, or remove that line")
    return text


def read_pairs(path: str | Path, prompt_field: str = "prompt", chosen_field: str = "chosen",
               rejected_field: str = "rejected") -> list[PreferencePair]:
    """Pairs from JSONL, one {prompt, chosen, rejected} object a line; a bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference file '{path}' does not exist; pass a JSONL file of prompt/chosen/rejected")
    fix = "give every line the prompt, chosen and rejected fields (or name them with --prompt_field etc.)"
    # One strict reader (file:line errors) per field: the files are small and the errors stay the corpus's own.
    fields = [jsonl_values(path, name, fix) for name in (prompt_field, chosen_field, rejected_field)]
    pairs = []
    for (number, prompt), (_, chosen), (_, rejected) in zip(*fields, strict=True):
        where = f"{path}:{number}"
        pairs.append(PreferencePair(_text(prompt, where, prompt_field), _completion(chosen, where, chosen_field),
                                    _completion(rejected, where, rejected_field)))
    if not pairs:
        raise UserError(f"preference file '{path}' holds no pairs")
    return pairs


def write_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    """JSONL with the field names `read_pairs` reads by default."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")


def split_hh_transcript(chosen: str, rejected: str) -> PreferencePair | None:
    """The shared prompt (up to and including the last "\\n\\nAssistant:") and the two final answers, or None
    when the two transcripts differ before their last answer or one answer is empty."""
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        return None
    prompt = chosen[:cut_c + len(HH_ASSISTANT)]
    if rejected[:cut_r + len(HH_ASSISTANT)] != prompt:
        return None
    answer_c, answer_r = chosen[len(prompt):], rejected[len(prompt):]
    if not answer_c.strip() or not answer_r.strip():
        return None
    return PreferencePair(prompt, answer_c, answer_r)


def _hh_records(path: Path) -> list[tuple[str, dict]]:
    records = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
            raise UserError(f"{where} has no 'chosen' and 'rejected' transcripts; is this an hh-rlhf file?")
        records.append((where, record))
    return records


def read_hh_rlhf(path: str | Path) -> tuple[list[PreferencePair], int]:
    """hh-rlhf (.jsonl or .jsonl.gz) → (pairs, number of records skipped because their transcripts differ
    before the final answer, or a final answer is empty)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hh-rlhf file '{path}' does not exist")
    pairs, skipped = [], 0
    for where, record in _hh_records(path):
        pair = split_hh_transcript(_text(record["chosen"], where, "chosen"),
                                   _text(record["rejected"], where, "rejected"))
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise UserError(f"'{path}' gave no usable pair ({skipped} records skipped)")
    return pairs, skipped


def hh_first_human_turns(path: str | Path) -> list[str]:
    """The opening human message of each hh-rlhf dialogue (red-team prompts), in file order."""
    turns = []
    for _, record in _hh_records(Path(path)):
        text = str(record["chosen"])
        start = text.find(HH_HUMAN)
        if start < 0:
            continue
        body = text[start + len(HH_HUMAN):]
        end = body.find(HH_ASSISTANT)
        turn = (body if end < 0 else body[:end]).strip()
        if turn:
            turns.append(turn)
    return turns


def is_hh_rlhf(path: str | Path) -> bool:
    """hh-rlhf files are gzipped JSONL named after the dataset, or any .jsonl.gz of transcripts."""
    name = Path(path).name
    return name.endswith(".jsonl.gz") or "hh-rlhf" in name


def read_preferences(path: str | Path, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected") -> list[PreferencePair]:
    """Pairs from either format: hh-rlhf transcripts (.jsonl.gz) or JSONL pairs."""
    if is_hh_rlhf(path):
        return read_hh_rlhf(path)[0]
    return read_pairs(path, prompt_field, chosen_field, rejected_field)


def ranking_to_pairs(prompt: str, completions_best_first: list[str]) -> list[PreferencePair]:
    """K ranked completions → K(K-1)/2 pairs, every better one before every worse one, ordered by the better
    one's rank, then the worse one's: (1,2), (1,3), ..., (1,K), (2,3), ..., (K-1,K)."""
    ranked = list(completions_best_first)
    if len(ranked) < 2:
        raise UserError(f"a ranking needs at least 2 completions; got {len(ranked)}")
    if len(set(ranked)) != len(ranked):
        raise UserError("a ranking holds the same completion twice; each must be distinct")
    return [PreferencePair(prompt, better, worse)
            for i, better in enumerate(ranked) for worse in ranked[i + 1:]]


def read_rankings(path: str | Path, prompt_field: str = "prompt", ranking_field: str = "ranking"
                  ) -> list[PreferencePair]:
    """JSONL of {"prompt": ..., "ranking": [best, ..., worst]} → all ordered pairs, line by line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ranking file '{path}' does not exist")
    fix = "give every line a prompt and a ranking list (best first)"
    pairs = []
    lines = zip(jsonl_values(path, prompt_field, fix), jsonl_values(path, ranking_field, fix), strict=True)
    for (number, prompt), (_, ranking) in lines:
        where = f"{path}:{number}"
        if not isinstance(ranking, list):
            raise UserError(f"{where}: '{ranking_field}' must be a list of completions, best first")
        ranked = [_completion(c, where, ranking_field) for c in ranking]
        try:
            pairs.extend(ranking_to_pairs(_text(prompt, where, prompt_field), ranked))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return pairs


def apply_chat_template(tokenizer: Tokenizer, pair: PreferencePair) -> PreferencePair:
    """The prompt as a user turn plus the assistant prefix, when the tokenizer has a chat template; the raw
    text otherwise (a base model continues plain text)."""
    if not tokenizer.chat_template:
        return pair
    prompt = tokenizer.render_chat([{"role": "user", "content": pair.prompt}], add_generation_prompt=True)
    return PreferencePair(prompt, pair.chosen, pair.rejected)


def split_pairs(pairs: list[PreferencePair], held_out: float, seed: int = 0
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): a fixed-seed shuffle, the last `held_out` share held out (at least one of each)."""
    if not 0.0 < held_out < 1.0:
        raise UserError(f"held-out fraction {held_out} must be between 0 and 1 (exclusive)")
    if len(pairs) < 2:
        raise UserError(f"splitting off held-out pairs needs at least 2 pairs; got {len(pairs)}")
    order = random.Random(seed).sample(range(len(pairs)), len(pairs))
    n_held = min(max(1, round(held_out * len(pairs))), len(pairs) - 1)
    return [pairs[i] for i in order[:-n_held]], [pairs[i] for i in order[-n_held:]]
