"""In-context learning prompts: an instruction, k worked examples drawn reproducibly from a pool, then the query.

Layout (each block rendered from an example's fields with `str.format`-style templates):

    {instruction}

    {input}
    {answer_prefix} {answer}            <- k demonstrations, separated by a blank line

    {input}
    {answer_prefix}                     <- the query; the model continues from here

With chain of thought the demonstrations answer "{cot_trigger} {reasoning} The answer is {answer}." and the
query ends with the trigger ("Let's think step by step."), so the model writes its reasoning first.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmforge.errors import UserError


@dataclass
class Example:
    """One task item: its raw fields, the gold answer(s) and, for multiple choice, the choices and label."""

    index: int
    fields: dict[str, str]
    references: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    label: int | None = None

    @property
    def answer(self) -> str:
        """The answer a demonstration shows: the right choice, else the first reference."""
        if self.choices is not None and self.label is not None:
            return self.choices[self.label]
        return self.references[0] if self.references else ""


@dataclass
class PromptSpec:
    instruction: str = field(default="", metadata={"help": "text before everything else; empty = none"})
    input: str = field(default="{input}", metadata={"help": "template of a query, over the example's fields"})
    answer_prefix: str = field(default="Answer:", metadata={"help": "text the answer follows"})
    target_delimiter: str = field(default=" ", metadata={"help": "between the answer prefix and the answer"})
    example_separator: str = field(default="\n\n", metadata={"help": "between instruction, examples and query"})
    chain_of_thought: bool = field(default=False, metadata={"help": "demonstrations show their reasoning"})
    cot_trigger: str = field(default="Let's think step by step.", metadata={"help": "opens every CoT answer"})
    reasoning: str = field(default="", metadata={"help": "template of a demonstration's worked reasoning"})
    cot_answer: str = field(default="The answer is {answer}.", metadata={"help": "closes a CoT demonstration"})


def render(template: str, fields: dict[str, str], what: str = "template") -> str:
    """template.format(**fields), with a one-line error naming a missing field."""
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise UserError(f"{what} '{template}' uses field {exc} that the data lacks; fields are: "
                        f"{', '.join(sorted(fields))}") from None
    except (IndexError, ValueError) as exc:
        raise UserError(f"{what} '{template}' is not a valid template ({exc}); write fields as {{name}}") from None


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def query_text(spec: PromptSpec, example: Example) -> str:
    """The query block: input, then the answer prefix (and the CoT trigger) the model continues from."""
    head = render(spec.input, example.fields, "prompt.input") + "\n" + spec.answer_prefix
    return head + spec.target_delimiter + spec.cot_trigger if spec.chain_of_thought else head


def demonstration(spec: PromptSpec, example: Example) -> str:
    """A worked example: the query block followed by its answer (with reasoning under chain of thought)."""
    if not spec.chain_of_thought:
        return query_text(spec, example) + spec.target_delimiter + example.answer
    reasoning = render(spec.reasoning, example.fields, "prompt.reasoning").strip() if spec.reasoning else ""
    if reasoning and reasoning[-1] not in ".!?":
        reasoning += "."
    close = render(spec.cot_answer, {**example.fields, "answer": example.answer}, "prompt.cot_answer")
    return query_text(spec, example) + " " + (f"{reasoning} {close}" if reasoning else close)


def draw_shots(pool: Sequence[Example], k: int, seed: int, query: Example, spec: PromptSpec) -> list[Example]:
    """k pool examples, a pure function of (seed, query.index). Never the query itself nor an example with the
    same input; the draws for k are the first k of those for any larger k, so a shots curve adds examples
    instead of swapping them."""
    if k <= 0:
        return []
    own_input = render(spec.input, query.fields, "prompt.input")
    order = np.random.default_rng([seed, query.index]).permutation(len(pool))
    shots = []
    for i in order:
        candidate = pool[int(i)]
        if candidate.fields == query.fields or render(spec.input, candidate.fields, "prompt.input") == own_input:
            continue
        shots.append(candidate)
        if len(shots) == k:
            return shots
    raise UserError(f"the shot pool has only {len(shots)} usable examples, fewer than shots={k}; "
                    "use fewer shots or a larger pool")


@dataclass
class Prompt:
    text: str
    shots: list[int]  # pool indices of the demonstrations kept, in prompt order
    dropped: int  # demonstrations dropped so the prompt fits the context
    fits: bool  # False: even the zero-shot prompt is too long (the scorer keeps its end)


def build_prompt(spec: PromptSpec, query: Example, shots: Sequence[Example],
                 fits: Callable[[str], bool] | None = None) -> Prompt:
    """Instruction + demonstrations + query. When `fits(text)` says the prompt is too long, demonstrations are
    dropped, farthest from the query first, never the query."""
    kept = list(shots)
    while True:
        parts = ([spec.instruction] if spec.instruction else []) + [demonstration(spec, s) for s in kept]
        text = spec.example_separator.join([*parts, query_text(spec, query)])
        ok = fits is None or fits(text)
        if ok or not kept:
            return Prompt(text, [s.index for s in kept], len(shots) - len(kept), ok)
        kept = kept[1:]
