"""Constitutional AI (Bai et al. 2022): a model improves its own answers against written principles.

Two products, from one set of red-team prompts:
- supervised (SL-CAI): the model answers, critiques its answer against a principle drawn with a seeded RNG,
  and revises it (optionally several rounds, a new principle each round); the revisions are prompt/completion
  records that `lmforge finetune` trains on;
- RLAIF: the model samples two answers per prompt and, as a judge, picks the better one against a principle
  through a multiple-choice question; the choice is read from its log-probabilities of " (A)" and " (B)" after
  "The answer is:" (both option orders, averaged, so a preference for a letter cancels), and the pairs are
  prompt/chosen/rejected records that `lmforge align dpo` and `lmforge align reward` read.

Conversations go through the tokenizer's chat template when it has one (the records then hold the raw user
prompt, as `finetune --template chat` and DPO expect), else through the hh-rlhf "Human:/Assistant:" transcript
(the records then hold the transcript prompt and a completion that starts with a space, as hh-rlhf does).
Generation is `lmforge.generate.generate_text`, batched; scoring is `lmforge.align.logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmforge.align.logprobs import pack_pairs, scoring_mode, sequence_logprob
from lmforge.data.corpus import jsonl_values
from lmforge.data.preferences import PreferencePair, hh_first_human_turns, is_hh_rlhf
from lmforge.errors import UserError
from lmforge.files import read_text
from lmforge.generate import SamplingConfig, generate_text
from lmforge.models import CausalLM
from lmforge.tokenizer import Tokenizer

DEFAULT_CONSTITUTION = "constitution.yaml"  # shipped beside this module
DEFAULT_CHOICE = "Which of these assistant responses is more helpful, honest and harmless?"
JUDGE_TEMPLATE = ("Consider the following conversation between a human and an assistant:\n"
                  "Human: {prompt}\n{question}\nOptions:\n(A) {first}\n(B) {second}")
JUDGE_START = "The answer is:"
OPTIONS = (" (A)", " (B)")
PLAIN_STOPS = ["\n\nHuman:", "\nHuman:", "\n\nAssistant:"]


# --- The constitution ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # asked after the answer: where does it fall short?
    revision: str  # asked after the critique: rewrite the answer
    choice: str = DEFAULT_CHOICE  # the RLAIF judge's multiple-choice question


@dataclass(frozen=True)
class Demonstration:
    """A few-shot example of one full round, shown before each conversation."""

    prompt: str
    answer: str
    critique: str
    revision: str
    principle: int = 0  # index of the principle whose requests it answers


@dataclass(frozen=True)
class Constitution:
    principles: list[Principle]
    examples: list[Demonstration] = field(default_factory=list)
    source: str = DEFAULT_CONSTITUTION


def _string(value: Any, where: str, name: str, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} has no '{name}' (a non-empty string); {fix}")
    return value.strip()


def parse_constitution(data: Any, source: str) -> Constitution:
    """Validate a constitution read from YAML; every error is one line naming the principle and the field."""
    fix = "see the default constitution (lmforge/align/constitution.yaml) for the layout"
    if not isinstance(data, dict) or "principles" not in data:
        raise UserError(f"constitution '{source}' must be a mapping with a 'principles' list; {fix}")
    raw = data["principles"]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"constitution '{source}' has no principles; give a non-empty 'principles' list")
    default_choice = data.get("choice", DEFAULT_CHOICE)
    default_choice = _string(default_choice, f"constitution '{source}'", "choice", fix)
    principles = []
    for number, item in enumerate(raw, start=1):
        where = f"constitution '{source}' principle {number}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is a {type(item).__name__}; each principle is a mapping with critique and "
                            "revision prompts")
        name = str(item.get("name") or f"principle-{number}")
        where = f"constitution '{source}' principle {number} ({name})"
        unknown = sorted(set(item) - {"name", "critique", "revision", "choice"})
        if unknown:
            raise UserError(f"{where} has unknown field(s) {unknown}; a principle has name, critique, revision, choice")
        principles.append(Principle(name, _string(item.get("critique"), where, "critique", fix),
                                    _string(item.get("revision"), where, "revision", fix),
                                    _string(item.get("choice", default_choice), where, "choice", fix)))
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise UserError(f"constitution '{source}' names two principles alike ({names}); give each a distinct name")
    examples = _examples(data.get("examples") or [], names, source, fix)
    return Constitution(principles, examples, source)


def _examples(raw: Any, names: list[str], source: str, fix: str) -> list[Demonstration]:
    if not isinstance(raw, list):
        raise UserError(f"constitution '{source}': 'examples' must be a list of prompt/answer/critique/revision")
    examples = []
    for number, item in enumerate(raw, start=1):
        where = f"constitution '{source}' example {number}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is a {type(item).__name__}; an example is a mapping")
        principle = item.get("principle", names[0])
        if principle not in names:
            raise UserError(f"{where} names principle '{principle}', which is not one of {names}")
        texts = [_string(item.get(k), where, k, fix) for k in ("prompt", "answer", "critique", "revision")]
        examples.append(Demonstration(*texts, principle=names.index(principle)))
    return examples


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The YAML at `path`, or the default constitution shipped with lmforge."""
    if path is None:
        text = resources.files("lmforge.align").joinpath(DEFAULT_CONSTITUTION).read_text(encoding="utf-8")
        source = DEFAULT_CONSTITUTION
    else:
        text, source = read_text(path, "constitution file"), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"constitution '{source}' is not valid YAML{at}; fix it") from None
    return parse_constitution(data, source)


def sample_principles(constitution: Constitution, count: int, rounds: int, seed: int) -> list[list[int]]:
    """count x rounds principle indexes, uniform with replacement: a pure function of the seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(len(constitution.principles), size=(count, rounds)).tolist()


# --- Red-team prompts -----------------------------------------------------------------------------------------

def read_red_team_prompts(path: str | Path, limit: int | None = None, field_name: str = "prompt") -> list[str]:
    """Prompts from hh-rlhf transcripts (their first human turns), a JSONL file (`field_name`) or a text file
    (one prompt a line); duplicates dropped, file order kept, the first `limit`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist; pass hh-rlhf transcripts (.jsonl.gz), a JSONL file "
                        f"with a '{field_name}' field or a text file with one prompt a line")
    if is_hh_rlhf(path):
        found = hh_first_human_turns(path)
    elif path.suffix == ".jsonl":
        fix = f"give every line a '{field_name}' (or name the field with --prompt_field)"
        found = [str(value).strip() for _, value in jsonl_values(path, field_name, fix)]
    else:
        found = [line.strip() for line in read_text(path, "prompt file").splitlines()]
    prompts = list(dict.fromkeys(p for p in found if p))[:limit]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts; give at least one non-empty prompt")
    return prompts


# --- Conversations --------------------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    """How a conversation becomes a prompt: the tokenizer's chat template, or the hh-rlhf transcript."""

    tokenizer: Tokenizer

    @property
    def templated(self) -> bool:
        return bool(self.tokenizer.chat_template)

    @property
    def reply_prefix(self) -> str:
        """What separates "Assistant:" from the reply in the plain transcript (nothing after a template)."""
        return "" if self.templated else " "

    @property
    def stops(self) -> list[str]:
        return [] if self.templated else list(PLAIN_STOPS)

    def render(self, messages: list[dict[str, str]], start: str = "") -> str:
        """The conversation, open for the assistant's reply, which begins with `start`."""
        if self.templated:
            return self.tokenizer.render_chat(messages, add_generation_prompt=True) + start
        turns = "".join(f"\n\nHuman: {m['content']}" if m["role"] == "user" else f"\n\nAssistant: {m['content']}"
                        for m in messages)
        return turns + "\n\nAssistant:" + (f" {start}" if start else "")

    def record_prompt(self, prompt: str) -> str:
        """The prompt as a training record holds it (the template is applied by the trainer)."""
        return prompt if self.templated else self.render([_user(prompt)])


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _demonstration_turns(constitution: Constitution) -> list[dict[str, str]]:
    turns = []
    for ex in constitution.examples:
        principle = constitution.principles[ex.principle]
        turns += [_user(ex.prompt), _assistant(ex.answer), _user(principle.critique), _assistant(ex.critique),
                  _user(principle.revision), _assistant(ex.revision)]
    return turns


# --- Generation and judging -------------------------------------------------------------------------------------

@dataclass
class CaiOptions:
    rounds: int = 1
    batch_size: int = 8
    few_shot: bool = True
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0
    preferences: bool = True
    both_orders: bool = True

    def __post_init__(self) -> None:
        for name in ("rounds", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0: CAI samples its answers")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # its own checks of top_k and top_p


@dataclass
class CaiData:
    sft: list[dict[str, Any]]  # prompt/completion records (+ what produced them)
    pairs: list[PreferencePair]
    judgements: list[dict[str, Any]]  # per pair: principle, P(first answer better), ...
    summary: dict[str, Any]


class _Generator:
    """Batched sampling with a fresh, derived seed per call (reproducible, and no two stages share draws);
    prompts longer than the model's room lose their start, as a chat keeps its latest turns."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, fmt: ChatFormat, options: CaiOptions) -> None:
        self.model, self.tokenizer, self.fmt, self.options = model, tokenizer, fmt, options
        self.room = model.token_room - options.max_new_tokens
        if self.room < 8:
            raise UserError(f"max_new_tokens={options.max_new_tokens} leaves no room for a prompt in the model's "
                            f"{model.room_text}; lower it")
        self.calls, self.truncated = 0, 0

    def fit(self, text: str) -> str:
        ids = self.tokenizer.encode(text)
        if len(ids) <= self.room:
            return text
        self.truncated += 1
        return self.tokenizer.decode(ids[-self.room:])

    def __call__(self, prompts: list[str]) -> list[str]:
        o = self.options
        replies: list[str] = []
        for start in range(0, len(prompts), o.batch_size):
            self.calls += 1
            cfg = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                                 top_p=o.top_p, seed=o.seed * 1_000_003 + self.calls, stop=self.fmt.stops)
            batch = [self.fit(p) for p in prompts[start:start + o.batch_size]]
            replies += [r.strip() for r in generate_text(self.model, self.tokenizer, batch, cfg)]
        return replies


def critique_and_revise(generate: _Generator, constitution: Constitution, prompts: list[str],
                        chosen: list[list[int]], few_shot: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """The first answers and, per prompt, the record of its rounds (principle, critique, revision)."""
    shots = _demonstration_turns(constitution) if few_shot else []
    fmt = generate.fmt
    answers = generate([fmt.render([*shots, _user(p)]) for p in prompts])
    current, history = list(answers), [[] for _ in prompts]
    for round_ in range(len(chosen[0]) if chosen else 0):
        principles = [constitution.principles[row[round_]] for row in chosen]
        talks = [[*shots, _user(p), _assistant(a), _user(pr.critique)]
                 for p, a, pr in zip(prompts, current, principles, strict=True)]
        critiques = generate([fmt.render(t) for t in talks])
        revisions = generate([fmt.render([*t, _assistant(c), _user(pr.revision)])
                              for t, c, pr in zip(talks, critiques, principles, strict=True)])
        for row, (pr, c, r) in enumerate(zip(principles, critiques, revisions, strict=True)):
            history[row].append({"principle": pr.name, "critique": c, "revision": r})
        current = revisions
    return answers, history


def judge_prompt(fmt: ChatFormat, prompt: str, first: str, second: str, principle: Principle) -> str:
    """The multiple-choice question of the CAI paper, open right before the model names an option."""
    question = JUDGE_TEMPLATE.format(prompt=prompt, question=principle.choice, first=first, second=second)
    return fmt.render([_user(question)], start=JUDGE_START)


@torch.no_grad()
def option_logprobs(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[str],
                    options: Sequence[str] = OPTIONS) -> torch.Tensor:
    """(len(prompts), len(options)): log p(option | prompt), summed over the option's tokens."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    option_ids = [tokenizer.encode(o) for o in options]
    rows_p = [tokenizer.encode(p) for p in prompts for _ in options]
    rows_c = [ids for _ in prompts for ids in option_ids]
    ids, attention, completion = pack_pairs(rows_p, rows_c, pad, max_length=model.token_room)
    device = model.embed.weight.device
    with scoring_mode(model):
        scores = sequence_logprob(model, ids.to(device), attention.to(device), completion.to(device))
    return scores.view(len(prompts), len(options)).cpu()


def judge_pairs(model: CausalLM, tokenizer: Tokenizer, fmt: ChatFormat, prompts: list[str],
                firsts: list[str], seconds: list[str], principles: list[Principle], fit: Any,
                both_orders: bool = True, batch_size: int = 8) -> list[float]:
    """P(first answer is better) per prompt: softmax over the log-probs of " (A)" and " (B)"; with both_orders
    the mean of the first-as-(A) and first-as-(B) readings."""
    texts = []
    for p, a, b, pr in zip(prompts, firsts, seconds, principles, strict=True):
        texts.append(fit(judge_prompt(fmt, p, a, b, pr)))
        if both_orders:
            texts.append(fit(judge_prompt(fmt, p, b, a, pr)))
    scores = torch.cat([option_logprobs(model, tokenizer, texts[i:i + batch_size])
                        for i in range(0, len(texts), batch_size)])
    p_a = torch.softmax(scores, dim=-1)[:, 0]
    if not both_orders:
        return p_a.tolist()
    return ((p_a[0::2] + (1 - p_a[1::2])) / 2).tolist()


def constitutional_data(model: CausalLM, tokenizer: Tokenizer, prompts: list[str], constitution: Constitution,
                        options: CaiOptions | None = None) -> CaiData:
    """One CAI pass over `prompts`: SFT records from critiques and revisions, and AI-judged preference pairs."""
    options = options or CaiOptions()
    if not isinstance(model, CausalLM):
        family = getattr(getattr(model, "cfg", None), "family", type(model).__name__)
        raise UserError(f"constitutional AI needs a causal language model (it generates and judges its own "
                        f"answers); this is a {family} model")
    if not prompts:
        raise UserError("no red-team prompts; give at least one")
    fmt = ChatFormat(tokenizer)
    generate = _Generator(model, tokenizer, fmt, options)
    chosen = sample_principles(constitution, len(prompts), options.rounds, options.seed)
    answers, history = critique_and_revise(generate, constitution, prompts, chosen, options.few_shot)
    sft, empty_revisions = _sft_records(fmt, prompts, answers, history)
    pairs, judgements, skipped = [], [], {}
    if options.preferences:
        pairs, judgements, skipped = _preferences(model, tokenizer, generate, constitution, prompts, options)
    summary = {
        "prompts": len(prompts), "rounds": options.rounds, "constitution": constitution.source,
        "principles": [p.name for p in constitution.principles], "chat_template": fmt.templated,
        "sft_records": len(sft), "sft_skipped_empty_revision": empty_revisions,
        "preference_pairs": len(pairs), "pairs_skipped": skipped, "prompts_truncated": generate.truncated,
        "principle_per_prompt": [[constitution.principles[i].name for i in row] for row in chosen],
        "judgements": judgements, "options": vars(options),
    }
    return CaiData(sft, pairs, judgements, summary)


def _sft_records(fmt: ChatFormat, prompts: list[str], answers: list[str], history: list[list[dict[str, Any]]]
                 ) -> tuple[list[dict[str, Any]], int]:
    records, empty = [], 0
    for prompt, answer, rounds in zip(prompts, answers, history, strict=True):
        final = rounds[-1]["revision"] if rounds else answer
        if not final:
            empty += 1
            continue
        records.append({"prompt": fmt.record_prompt(prompt), "completion": fmt.reply_prefix + final,
                        "red_team_prompt": prompt, "initial_answer": answer, "rounds": rounds})
    return records, empty


def _preferences(model: CausalLM, tokenizer: Tokenizer, generate: _Generator, constitution: Constitution,
                 prompts: list[str], options: CaiOptions) -> tuple[list[PreferencePair], list[dict], dict]:
    """Two sampled answers per prompt, judged against a principle drawn from a second seeded stream."""
    fmt = generate.fmt
    doubled = [fmt.render([_user(p)]) for p in prompts for _ in range(2)]
    samples = generate(doubled)
    firsts, seconds = samples[0::2], samples[1::2]
    picks = sample_principles(constitution, len(prompts), 1, options.seed + 1)
    keep = [i for i in range(len(prompts)) if firsts[i] and seconds[i] and firsts[i] != seconds[i]]
    skipped = {"empty_answer": sum(1 for i in range(len(prompts)) if not firsts[i] or not seconds[i]),
               "identical_answers": sum(1 for i in range(len(prompts))
                                        if firsts[i] and firsts[i] == seconds[i])}
    principles = [constitution.principles[picks[i][0]] for i in keep]
    probs = judge_pairs(model, tokenizer, fmt, [prompts[i] for i in keep], [firsts[i] for i in keep],
                        [seconds[i] for i in keep], principles, generate.fit, options.both_orders,
                        options.batch_size) if keep else []
    pairs, judgements = [], []
    for i, principle, p_first in zip(keep, principles, probs, strict=True):
        better, worse = (firsts[i], seconds[i]) if p_first >= 0.5 else (seconds[i], firsts[i])
        pairs.append(PreferencePair(fmt.record_prompt(prompts[i]), fmt.reply_prefix + better,
                                    fmt.reply_prefix + worse))
        judgements.append({"prompt_index": i, "principle": principle.name, "p_first_better": p_first,
                           "p_chosen": max(p_first, 1 - p_first), "chosen": "first" if p_first >= 0.5 else "second"})
    return pairs, judgements, skipped


__all__ = [
    "CaiData", "CaiOptions", "ChatFormat", "Constitution", "Demonstration", "Principle", "constitutional_data",
    "judge_pairs", "judge_prompt", "load_constitution", "option_logprobs", "parse_constitution",
    "read_red_team_prompts", "sample_principles",
]
