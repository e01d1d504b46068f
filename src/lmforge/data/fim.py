"""Fill-in-the-middle (FIM): the document-level transformation of Bavarian et al. 2022 ("Efficient Training of
Language Models to Fill in the Middle").

With probability `rate` a document is cut at two uniformly random *character* positions into prefix, middle and
suffix (before tokenisation, the paper's choice), each part is tokenised on its own, and the parts are rearranged so
that a left-to-right model learns to write the middle after seeing both sides:

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle          (then the shard's EOS)
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

SPM is the paper's variant (its appendix D), not the naive "<fim_suffix> suffix <fim_prefix> prefix <fim_middle>
middle": the middle follows the prefix directly, so an SPM infill is an ordinary continuation of the prefix, and the
two modes share all three sentinel tokens, so a `psm+spm` run trains both prompt formats with one vocabulary. Prefix
and middle are still encoded separately, so the token boundary a model sees in training is the one it meets at
inference, where the prefix arrives already tokenised and the middle starts on a fresh token.

The other documents stay left-to-right. Which documents are transformed and where they are cut is a pure function of
(seed, document index), and the transformation is applied once, when the token shard is built (as the paper applies
it before packing), so every batch stays a pure function of its index and resume replays exactly.

The tokenizer carries the three special tokens and the mode the model was trained in (`fim_mode` in
tokenizer_config.json), so a checkpoint knows how to build its own infilling prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.errors import UserError
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"  # StarCoder's spellings
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
FIM_MODES = ("psm", "spm", "psm+spm")  # psm+spm: each transformed document picks one of the two, 50/50
FIM_MODE_KEY = "fim_mode"  # where the trained mode lives in tokenizer_config.json


@dataclass(frozen=True)
class FimSplit:
    """A document cut in three; prefix + middle + suffix is the document."""

    prefix: str
    middle: str
    suffix: str


def check_fim_options(rate: float, mode: str) -> None:
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"fim_rate={rate} must be in [0, 1]; Bavarian et al. recommend 0.5 (0.9 for code models)")
    if mode not in FIM_MODES:
        raise UserError(f"fim_mode='{mode}' is not one of: {', '.join(FIM_MODES)}")


def split_document(text: str, rng: np.random.Generator) -> FimSplit:
    """Cut `text` at two uniformly random character positions in [0, len(text)] (empty parts allowed)."""
    low, high = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
    return FimSplit(text[:low], text[low:high], text[high:])


def choose_fim(text: str, rng: np.random.Generator, rate: float, mode: str) -> tuple[FimSplit, str] | None:
    """(split, 'psm' | 'spm') for a document chosen with probability `rate`, None for one left as it is.

    The draws are made in a fixed order whatever the outcome, so the rng is used the same way for every document.
    """
    chosen = rng.random() < rate
    spm = rng.random() < 0.5 if mode == "psm+spm" else mode == "spm"
    split = split_document(text, rng)
    return (split, "spm" if spm else "psm") if chosen else None


def fim_token_ids(tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """Ids of <fim_prefix>, <fim_suffix>, <fim_middle>, or None when the tokenizer lacks any of them."""
    ids = [tokenizer.backend.token_to_id(token) for token in FIM_TOKENS]
    return None if None in ids else (ids[0], ids[1], ids[2])


def require_fim(tokenizer: Tokenizer) -> tuple[int, int, int]:
    ids = fim_token_ids(tokenizer)
    if ids is None:
        raise UserError(f"this model's tokenizer has no {', '.join(FIM_TOKENS)} tokens, so it was not trained to fill "
                        "in the middle; pre-train one with `lmforge pretrain --objective fim`")
    return ids


def add_fim_tokens(tokenizer: Tokenizer, mode: str) -> None:
    """Give `tokenizer` the three FIM special tokens (new ids at the end where missing) and an EOS if it has none,
    and record `mode`.

    They are special added tokens, so they are matched before any pre-tokenisation (text never merges across them)
    and HF tokenizers loaded from the saved files treat them as special too.
    """
    check_fim_options(0.0, mode)
    if tokenizer.eos_id is None:  # a char tokenizer has none, but the middle must end: FIM documents end in EOS
        tokenizer.backend.add_special_tokens([DEFAULT_SPECIALS["eos"]])
        tokenizer.specials["eos"] = DEFAULT_SPECIALS["eos"]
    tokenizer.backend.add_special_tokens(list(FIM_TOKENS))
    tokenizer.config[FIM_MODE_KEY] = mode
    extra = [t for t in tokenizer.config.get("additional_special_tokens", []) if t not in FIM_TOKENS]
    tokenizer.config["additional_special_tokens"] = [*extra, *FIM_TOKENS]


def trained_fim_mode(tokenizer: Tokenizer) -> str:
    """The mode the model was trained in, as its tokenizer records it ('psm' when the record is missing)."""
    mode = tokenizer.config.get(FIM_MODE_KEY, "psm")
    if mode not in FIM_MODES:
        raise UserError(f"tokenizer_config.json has {FIM_MODE_KEY}='{mode}', not one of {', '.join(FIM_MODES)}; "
                        "fix the file")
    return mode


def arrange(parts: Sequence[list[int]], mode: str, fim_ids: tuple[int, int, int]) -> list[int]:
    """Token ids of a transformed document from the separately encoded (prefix, middle, suffix)."""
    prefix, middle, suffix = parts
    pre, suf, mid = fim_ids
    if mode == "spm":
        return [pre, suf, *suffix, mid, *prefix, *middle]
    return [pre, *prefix, suf, *suffix, mid, *middle]


def infill_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, mode: str | None = None) -> list[int]:
    """The prompt whose continuation is the middle: PSM or SPM as the model was trained (psm+spm models: PSM)."""
    fim_ids = require_fim(tokenizer)
    mode = trained_fim_mode(tokenizer) if mode is None else mode
    return arrange([tokenizer.encode(prefix), [], tokenizer.encode(suffix)], "spm" if mode == "spm" else "psm",
                   fim_ids)


class FimEncoder:
    """Callable: a batch of documents -> their token ids, with the FIM transformation applied to a `rate` share.

    Documents are numbered in the order they arrive; document n draws from default_rng((seed, n)), so the result
    depends on the corpus and the seed only, not on how the stream is batched.
    """

    def __init__(self, tokenizer: Tokenizer, rate: float, mode: str, seed: int = 0) -> None:
        check_fim_options(rate, mode)
        self.tokenizer, self.rate, self.mode, self.seed = tokenizer, rate, mode, seed
        self.fim_ids = require_fim(tokenizer)
        self.documents = 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        choices = [choose_fim(text, np.random.default_rng((self.seed, self.documents + n)), self.rate, self.mode)
                   for n, text in enumerate(texts)]
        self.documents += len(texts)
        # One batched encode for every piece: whole documents, or the three parts of a transformed one.
        pieces = [[c[0].prefix, c[0].middle, c[0].suffix] if c else [text] for text, c in zip(texts, choices,
                                                                                               strict=True)]
        flat = iter(self.tokenizer.encode_batch([p for parts in pieces for p in parts]))
        out = []
        for choice in choices:
            if choice is None:
                out.append(next(flat))
            else:
                out.append(arrange([next(flat), next(flat), next(flat)], choice[1], self.fim_ids))
        return out


def restore_document(ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """The document back from its ids, transformed or not (the inverse of `FimEncoder`, for checks and inspection).

    In both modes the prefix lies between <fim_prefix> and <fim_suffix> (SPM: empty, its prefix heads the tail),
    the suffix between <fim_suffix> and <fim_middle>, and the tail after <fim_middle> is prefix + middle (SPM) or
    the middle (PSM); so the document is always head + tail + suffix.
    """
    ids = [int(i) for i in ids]
    fim_ids = fim_token_ids(tokenizer)
    if fim_ids is None or fim_ids[0] not in ids:
        return tokenizer.decode(ids)
    pre, suf, mid = (ids.index(token) for token in fim_ids)
    if not pre < suf < mid:
        raise UserError("the ids are not a FIM document (<fim_prefix>, <fim_suffix>, <fim_middle> out of order)")
    decode = tokenizer.decode
    return decode(ids[:pre]) + decode(ids[pre + 1:suf]) + decode(ids[mid + 1:]) + decode(ids[suf + 1:mid])
