"""The two ways to score a task: log-likelihood of each choice (multiple choice, as lm-eval-harness does) and
generation with the core decoding options. Both work for decoder-only and encoder-decoder models; prompts
too long for the context keep their end (the answer prefix and the query), never their start.
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


def require_lm(model: Model) -> None:
    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise UserError(f"evaluation needs a causal or seq2seq language model; this is a {type(model).__name__} "
                        "(an encoder); use a decoder or encoder-decoder checkpoint")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text, or a one-line error when the tokenizer cannot represent it (a char vocabulary)."""
    try:
        return tokenizer.encode(text)
    except Exception as exc:  # the Rust backend raises a bare Exception for unknown characters
        raise UserError(f"the model's tokenizer cannot encode the task's text ({exc}); use a model whose "
                        "tokenizer covers it, e.g. byte-level BPE") from None


def start_tokens(tokenizer: Tokenizer) -> list[int]:
    """What a document starts after: BOS where the tokenizer itself adds one (Llama), else the EOS that lmforge
    and GPT-2 put between training documents, else nothing."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is not None and tokenizer.backend.encode("a", add_special_tokens=True).ids[:1] == [bos]:
        return [bos]
    if eos is not None:
        return [eos]
    return [] if bos is None else [bos]


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


def choice_requests(model: Model, tokenizer: Tokenizer, prompt: str, continuations: Sequence[str]) -> list[Request]:
    """(context, continuation) ids per choice. For a decoder the continuation is what encode(prompt + choice) adds
    to encode(prompt), so tokens that merge across the boundary are scored as the model would read them."""
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
                  delimiter: str = " ", batch_size: int = 8) -> list[ChoiceScores]:
    """Per prompt, the log-likelihood of each choice (prefixed by `delimiter`) as its continuation."""
    requests, spans = [], []
    for prompt, options in zip(prompts, choices, strict=True):
        conts = [delimiter + c for c in options]
        spans.append((len(requests), conts))
        requests += choice_requests(model, tokenizer, prompt, conts)
    scored = loglikelihoods(model, requests, batch_size)
    results = []
    for start, conts in spans:
        rows = scored[start:start + len(conts)]
        results.append(ChoiceScores([r[0] for r in rows], [len(c.encode()) for c in conts], [r[1] for r in rows],
                                    any(r[2] for r in rows)))
    return results


# -- generation -----------------------------------------------------------------------------------------------------
def prompt_ids(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): the prompt as the model reads it, cut from the left to leave room for the answer."""
    if isinstance(model, Seq2SeqLM):
        ids = encode(tokenizer, prompt) + ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
        room = model.token_room if model.cfg.positions != "relative" else len(ids)
    else:
        ids = start_tokens(tokenizer) + encode(tokenizer, prompt)
        room = model.token_room - max_new_tokens
        if room < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                            f"{model.room_text}; lower max_new_tokens")
    return (ids, False) if len(ids) <= room else (ids[-room:], True)


def generate_answers(model: Model, tokenizer: Tokenizer, prompts: Sequence[str], cfg: SamplingConfig,
                     batch_size: int = 8) -> list[tuple[str, bool]]:
    """(generated text cut at the first stop string, prompt truncated?) per prompt, in batches of similar
    length (left-padded for a decoder)."""
    require_lm(model)
    encoded = [prompt_ids(model, tokenizer, p, cfg.max_new_tokens) for p in prompts]
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
