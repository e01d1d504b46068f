"""The two ways to score a task: log-likelihood of each choice (multiple choice, as lm-eval-harness does) and
generation with the core decoding options. Both work for decoder-only and encoder-decoder models; prompts
too long for the context keep their end (the answer prefix and the query), never their start.

What a prompt starts with is a convention (`start`), and published numbers depend on it:
- "tokenizer": lm-evaluation-harness's (0.4.13, HFLM with add_bos_token unset): only the special tokens the
  tokenizer itself adds (Llama's BOS; nothing for GPT-2), and BOS-else-EOS as the context of an empty one;
- "eos": lmforge's, for models trained on documents separated by EOS: a prompt starts after the EOS that ends
  the previous document (BOS where the tokenizer adds one itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.data.batches import pad_batch
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import CausalLM, Model, Seq2SeqLM
from lmforge.tokenizer import Tokenizer

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)
STARTS = ("tokenizer", "eos")


def require_lm(model: Model) -> None:
    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise UserError(f"evaluation needs a causal or seq2seq language model; this is a {type(model).__name__} "
                        "(an encoder); use a decoder or encoder-decoder checkpoint")


def encode(tokenizer: Tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of text (with the special tokens the tokenizer adds itself when `special`), or a one-line
    error when the tokenizer cannot represent it (a char vocabulary)."""
    try:
        return tokenizer.backend.encode(text, add_special_tokens=special).ids
    except Exception as exc:  # the Rust backend raises a bare Exception for unknown characters
        raise UserError(f"the model's tokenizer cannot encode the task's text ({exc}); use a model whose "
                        "tokenizer covers it, e.g. byte-level BPE") from None


def resolve_start(start: str, hf_folder: bool) -> str:
    """The start convention to use: `auto` is lm-evaluation-harness's for a Hugging Face folder (so its numbers
    compare with the published ones) and lmforge's for an lmforge checkpoint (trained with EOS separators)."""
    if start == "auto":
        return "tokenizer" if hf_folder else "eos"
    check_start(start)
    return start


def check_start(start: str) -> None:
    if start not in STARTS:
        raise UserError(f"start={start!r} is not a start convention; use tokenizer (lm-evaluation-harness's), "
                        "eos (lmforge's) or, on the command line, auto")


def start_tokens(tokenizer: Tokenizer) -> list[int]:
    """lmforge's convention: what a document starts after. BOS where the tokenizer itself adds one (Llama), else
    the EOS that lmforge and GPT-2 put between training documents, else nothing."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is not None and _added_tokens(tokenizer)[:1] == [bos]:
        return [bos]
    if eos is not None:
        return [eos]
    return [] if bos is None else [bos]


def describe_start(model: Model, tokenizer: Tokenizer, start: str) -> str:
    """One line saying which tokens the convention puts around a prompt, for the report and the table."""
    check_start(start)
    name = ", ".join
    if start == "eos":
        if isinstance(model, Seq2SeqLM):
            ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
            return f"eos (lmforge's): the encoder reads the prompt then {name(_names(tokenizer, ids)) or 'nothing'}"
        ids = start_tokens(tokenizer)
        return f"eos (lmforge's): every prompt starts after {name(_names(tokenizer, ids)) or 'nothing'}"
    added = name(_names(tokenizer, _added_tokens(tokenizer))) or "nothing"
    prefix = _prefix_id(tokenizer)
    empty = f"; an empty context is {name(_names(tokenizer, [prefix]))}" if prefix is not None else ""
    return (f"tokenizer (lm-evaluation-harness's): only what the tokenizer adds, here {added}"
            f"{empty if isinstance(model, CausalLM) else ''}")


def _added_tokens(tokenizer: Tokenizer) -> list[int]:
    """The special tokens the tokenizer's post-processor puts around any text (an empty one encodes to just them)."""
    return tokenizer.backend.encode("", add_special_tokens=True).ids


def _names(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [f"{tokenizer.backend.id_to_token(i)} (id {i})" for i in ids]


# -- lm-evaluation-harness's encoding (0.4.13: TemplateLM.loglikelihood / _encode_pair, HFLM.tok_encode) -------------
def _prefix_id(tokenizer: Tokenizer) -> int | None:
    """HFLM.prefix_token_id: BOS, else EOS. lm-eval uses it as the context of a request whose context is empty."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def _tok_encode(tokenizer: Tokenizer, text: str, special: bool | None = None) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: transformers' default add_special_tokens=True, i.e. whatever the
    tokenizer adds itself, except for a text that already starts with the prefix token's text."""
    if special is None:
        prefix = _prefix_id(tokenizer)
        special = prefix is None or not text.startswith(tokenizer.decode([prefix]))
    return encode(tokenizer, text, special)


def _lm_eval_request(tokenizer: Tokenizer, context: str, continuation: str, seq2seq: bool) -> Request:
    """(context ids, continuation ids) exactly as lm-eval tokenizes a loglikelihood request."""
    if context == "":  # the prefix token is the context, unless the continuation already starts with it
        cont = _tok_encode(tokenizer, continuation, special=False)
        prefix = _prefix_id(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return ([] if prefix is None else [prefix]), cont
    spaces = len(context) - len(context.rstrip())  # trailing whitespace belongs to the continuation
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if seq2seq:  # encoded apart; the continuation (the decoder's targets) without special tokens
        return _tok_encode(tokenizer, context), _tok_encode(tokenizer, continuation, special=False)
    whole, ctx = _tok_encode(tokenizer, context + continuation), _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]  # tokens that merge across the boundary are scored as the model reads them


def prompt_tokens(model: Model, tokenizer: Tokenizer, prompt: str, start: str = "eos") -> list[int]:
    """The ids a model reads for a prompt under a start convention (before any truncation)."""
    check_start(start)
    if start == "tokenizer":
        # lm-eval's tok_batch_encode: the tokenizer's own special tokens, none on a decoder's prompt that already
        # starts with the BOS text
        bos = tokenizer.specials.get("bos")
        return encode(tokenizer, prompt, special=not (isinstance(model, CausalLM) and bos and prompt.startswith(bos)))
    if isinstance(model, Seq2SeqLM):
        return encode(tokenizer, prompt) + ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
    return start_tokens(tokenizer) + encode(tokenizer, prompt)


def _device(model: Model) -> torch.device:
    return model.embed.weight.device


# -- multiple choice ------------------------------------------------------------------------------------------------
@dataclass
class ChoiceScores:
    loglikelihoods: list[float]  # sum of log p(choice tokens | prompt), nats
    byte_lengths: list[int]  # UTF-8 bytes of each continuation, for the length-normalised score
    greedy: list[bool]  # whether greedy decoding would write the choice
    truncated: bool

    @property
    def prediction(self) -> int:
        return max(range(len(self.loglikelihoods)), key=lambda i: self.loglikelihoods[i])

    @property
    def prediction_norm(self) -> int:
        """lm-eval's acc_norm: log-likelihood per byte, so long choices are not penalised for their length."""
        return max(range(len(self.loglikelihoods)),
                   key=lambda i: self.loglikelihoods[i] / max(1, self.byte_lengths[i]))


def choice_requests(model: Model, tokenizer: Tokenizer, prompt: str, continuations: Sequence[str],
                    start: str = "eos") -> list[Request]:
    """(context, continuation) ids per choice. For a decoder the continuation is what encode(prompt + choice) adds
    to encode(prompt), so tokens that merge across the boundary are scored as the model would read them."""
    check_start(start)
    if start == "tokenizer":
        return [_lm_eval_request(tokenizer, prompt, c, isinstance(model, Seq2SeqLM)) for c in continuations]
    if isinstance(model, Seq2SeqLM):  # the encoder reads the prompt; the decoder writes the bare answer
        context = encode(tokenizer, prompt) + ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
        return [(context, encode(tokenizer, c.strip())) for c in continuations]
    context = start_tokens(tokenizer) + encode(tokenizer, prompt)
    plain = len(context) - len(start_tokens(tokenizer))
    requests = []
    for cont in continuations:
        whole = encode(tokenizer, prompt + cont)
        same_start = whole[:plain] == context[len(context) - plain:]
        requests.append((context, whole[plain:] if same_start and len(whole) > plain else encode(tokenizer, cont)))
    return requests


@torch.inference_mode()
def loglikelihoods(model: Model, requests: Sequence[Request], batch_size: int = 8) -> list[tuple[float, bool, bool]]:
    """(sum log p(continuation | context), greedy?, context truncated?) per request, computed in batches of
    similar length. A decoder keeps the last context_length+1 tokens of context + continuation."""
    require_lm(model)
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    results: list[tuple[float, bool, bool]] = [(0.0, False, False)] * len(requests)
    score = _seq2seq_batch if isinstance(model, Seq2SeqLM) else _causal_batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for row, result in zip(rows, score(model, [requests[i] for i in rows]), strict=True):
            results[row] = result
    return results


def _causal_batch(model: CausalLM, batch: list[Request]) -> list[tuple[float, bool, bool]]:
    limit = model.token_room + 1
    seqs, counts = [], []
    for context, cont in batch:
        if not cont:
            raise UserError("a choice encodes to no tokens; every choice needs some text")
        whole = (context + cont)[-limit:]
        seqs.append(whole)
        counts.append(min(len(cont), len(whole) - 1))
    inputs, _ = pad_batch([s[:-1] for s in seqs], 0, _device(model), side="right")
    logits = model(inputs).logits
    out = []
    for row, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
        targets = torch.tensor(seq[len(seq) - n:], device=inputs.device)
        picked = F.log_softmax(logits[row, len(seq) - 1 - n:len(seq) - 1].float(), dim=-1)  # only what is scored
        greedy = bool((picked.argmax(-1) == targets).all())
        truncated = len(seq) < len(batch[row][0]) + len(batch[row][1])
        out.append((picked.gather(-1, targets[:, None]).sum().item(), greedy, truncated))
    return out


def _seq2seq_batch(model: Seq2SeqLM, batch: list[Request]) -> list[tuple[float, bool, bool]]:
    limit = model.cfg.context_length
    bounded = model.cfg.positions != "relative"  # relative positions have no table to run off the end of
    sources = [c[-model.token_room:] if bounded else c for c, _ in batch]
    targets = [t[:limit] for _, t in batch]
    if any(not t for t in targets):
        raise UserError("a choice encodes to no tokens; every choice needs some text")
    device = _device(model)
    ids, mask = pad_batch(sources, 0, device, side="right")
    labels, _ = pad_batch(targets, -100, device, side="right")
    logits = model(ids, mask, decoder_input_ids=model.shift_right(labels)).logits
    out = []
    for row, (source, target, (context, _)) in enumerate(zip(sources, targets, batch, strict=True)):
        wanted = torch.tensor(target, device=device)
        picked = F.log_softmax(logits[row, :len(target)].float(), dim=-1)
        out.append((picked.gather(-1, wanted[:, None]).sum().item(), bool((picked.argmax(-1) == wanted).all()),
                    len(source) < len(context)))
    return out


def score_choices(model: Model, tokenizer: Tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  delimiter: str = " ", batch_size: int = 8, start: str = "eos") -> list[ChoiceScores]:
    """Per prompt, the log-likelihood of each choice (prefixed by `delimiter`) as its continuation, the prompt
    starting as the `start` convention says."""
    requests, spans = [], []
    for prompt, options in zip(prompts, choices, strict=True):
        conts = [delimiter + c for c in options]
        spans.append((len(requests), conts))
        requests += choice_requests(model, tokenizer, prompt, conts, start)
    scored = loglikelihoods(model, requests, batch_size)
    results = []
    for start, conts in spans:
        rows = scored[start:start + len(conts)]
        results.append(ChoiceScores([r[0] for r in rows], [len(c.encode()) for c in conts], [r[1] for r in rows],
                                    any(r[2] for r in rows)))
    return results


# -- generation -----------------------------------------------------------------------------------------------------
def prompt_ids(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
               start: str = "eos") -> tuple[list[int], bool]:
    """(ids, truncated): the prompt as the model reads it, cut from the left to leave room for the answer."""
    ids = prompt_tokens(model, tokenizer, prompt, start)
    if isinstance(model, Seq2SeqLM):
        room = model.token_room if model.cfg.positions != "relative" else len(ids)
    else:
        room = model.token_room - max_new_tokens
        if room < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                            f"{model.room_text}; lower max_new_tokens")
    return (ids, False) if len(ids) <= room else (ids[-room:], True)


def generate_answers(model: Model, tokenizer: Tokenizer, prompts: Sequence[str], cfg: SamplingConfig,
                     batch_size: int = 8, start: str = "eos") -> list[tuple[str, bool]]:
    """(generated text cut at the first stop string, prompt truncated?) per prompt, in batches of similar
    length (left-padded for a decoder); prompts start as the `start` convention says."""
    require_lm(model)
    encoded = [prompt_ids(model, tokenizer, p, cfg.max_new_tokens, start) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for row, text in zip(rows, _generate_batch(model, tokenizer, [encoded[i][0] for i in rows], cfg),
                             strict=True):
            texts[row] = text
    return [(text, truncated) for text, (_, truncated) in zip(texts, encoded, strict=True)]


def _generate_batch(model: Model, tokenizer: Tokenizer, ids: list[list[int]], cfg: SamplingConfig) -> list[str]:
    def cut(text: str) -> int | None:
        return min((text.index(s) for s in cfg.stop if s in text), default=None)

    def should_stop(row: int, tokens: list[int]) -> bool:
        return cut(tokenizer.decode(tokens, skip_special_tokens=True)) is not None

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    new = generate(model, ids, cfg, eos_id=tokenizer.eos_id, pad_id=pad, should_stop=should_stop if cfg.stop else None)
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]
    return [text[:cut(text)] if cut(text) is not None else text for text in texts]
