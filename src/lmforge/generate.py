"""Decoding: greedy, sampling with temperature / top-k / top-p, KV-cached and batched.

`filter_logits` is the one place the sampling rules live; `generate` works on token ids and
`generate_text` adds the tokenizer, stop strings and streaming text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.data.batches import pad_batch
from lmforge.data.fim import infill_prompt, require_fim
from lmforge.errors import UserError
from lmforge.models import CausalLM, MaskedLM, Seq2SeqLM
from lmforge.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy; <1 sharper, >1 flatter"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set with probability >= p; 1 = off"})
    greedy: bool = field(default=False, metadata={"help": "always take the most likely token"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop when any of these strings appears"})
    stop_at_eos: bool = field(default=True, metadata={"help": "end a sequence at the tokenizer's EOS token"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value included), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most-likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p  # the top token always survives (its mass_before is 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in that order (as HF and most servers apply them)."""
    logits = logits.float() / max(temperature, 1e-8)
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


Stepper = Callable[[torch.Tensor | None], torch.Tensor]


def _causal_stepper(model: CausalLM, prompts: Sequence[Sequence[int]], max_new: int,
                    pad_id: int) -> tuple[Stepper, int]:
    """step(None) reads the prompts; step(tokens) feeds the chosen tokens. Each returns (B, vocab) logits."""
    longest, room = max(len(p) for p in prompts), model.token_room
    budget = min(max_new, room - longest)
    if budget < 1:
        raise UserError(f"the prompt has {longest} tokens, which fills the model's {model.room_text}; "
                        "shorten the prompt")
    ids, mask = pad_batch(prompts, pad_id, model.embed.weight.device)
    attention = mask if bool((mask == 0).any()) else None
    cache = model.new_cache(len(prompts), longest + budget)

    def step(token: torch.Tensor | None) -> torch.Tensor:
        nonlocal attention
        if token is None:
            return model(ids, attention_mask=attention, cache=cache, last_only=True).logits[:, -1]
        if attention is not None:
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)
        return model(token[:, None], attention_mask=attention, cache=cache, last_only=True).logits[:, -1]

    return step, budget


def _seq2seq_stepper(model: Seq2SeqLM, prompts: Sequence[Sequence[int]], max_new: int,
                     pad_id: int) -> tuple[Stepper, int]:
    """The encoder reads the inputs once; the decoder starts from `decoder_start_id` and reuses both
    its own keys/values and the cross-attention keys/values (computed at the first step)."""
    cfg, longest = model.cfg, max(len(p) for p in prompts)
    bounded = cfg.positions != "relative"  # relative positions have no table to run off the end of
    if bounded and longest > model.token_room:
        raise UserError(f"the input has {longest} tokens, more than the model's {model.room_text}; shorten it")
    budget = min(max_new, cfg.context_length - 1) if bounded else max_new
    ids, mask = pad_batch(prompts, pad_id, model.embed.weight.device, side="right")
    attention = mask if bool((mask == 0).any()) else None
    memory = model.encode(ids, attention)
    cache = model.new_cache(len(prompts), budget + 1)
    start = ids.new_full((len(prompts), 1), cfg.decoder_start_id)

    def step(token: torch.Tensor | None) -> torch.Tensor:
        inputs = start if token is None else token[:, None]
        return model.decode(inputs, memory, attention, cache, last_only=True)[:, -1]

    return step, budget


@torch.inference_mode()
def generate(
    model: CausalLM | Seq2SeqLM,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig | None = None,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) — or, for an encoder-decoder, answer each input;
    returns the new tokens of each, without the prompt.

    should_stop(row, new_tokens) ends a row early (stop strings); on_token receives each step's
    tokens (B,) as they are chosen, for streaming.
    """
    cfg = cfg or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token; give a non-empty prompt or a BOS token")
    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise UserError(f"a {type(model).__name__} does not generate text; use a causal or seq2seq checkpoint")
    model.eval()
    device = model.embed.weight.device
    stepper = _seq2seq_stepper if isinstance(model, Seq2SeqLM) else _causal_stepper
    step, budget = stepper(model, prompts, cfg.max_new_tokens, pad_id)
    generator = None
    if cfg.seed is not None and not cfg.is_greedy:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    logits = step(None)
    for index in range(budget):
        token = next_tokens(logits, cfg, generator)
        if eos_id is not None and any(finished):  # finished rows keep emitting EOS
            token = token.masked_fill(torch.tensor(finished, device=device), eos_id)
        if on_token is not None:
            on_token(token)
        _record(token.tolist(), out, finished, cfg, eos_id, should_stop)
        if index == budget - 1 or all(finished):
            break  # no forward for logits nobody will read
        logits = step(token)
    return out


def _record(tokens: list[int], out: list[list[int]], finished: list[bool], cfg: SamplingConfig,
            eos_id: int | None, should_stop: Callable[[int, list[int]], bool] | None) -> None:
    """Append this step's tokens to the unfinished rows, marking rows that end here as finished."""
    for row, value in enumerate(tokens):
        if finished[row]:
            continue
        if cfg.stop_at_eos and eos_id is not None and value == eos_id:
            finished[row] = True
            continue
        out[row].append(value)
        if should_stop is not None and should_stop(row, out[row]):
            finished[row] = True


def generate_text(
    model: CausalLM | Seq2SeqLM,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    cfg: SamplingConfig | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Continue text prompts; stop strings are cut from the output. on_text(row, piece) streams text."""
    cfg = cfg or SamplingConfig()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(model, Seq2SeqLM):  # encoder inputs end with EOS, as in pre-training
        encoded = [tokenizer.encode(t, add_eos=True) for t in texts]
    else:
        encoded = [tokenizer.encode(t) or [tokenizer.bos_id if tokenizer.bos_id is not None else 0] for t in texts]
    shown = [0] * len(texts)

    def decoded(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def stop_index(text: str) -> int | None:
        return min((text.index(s) for s in cfg.stop if s in text), default=None)

    def should_stop(row: int, tokens: list[int]) -> bool:
        text = decoded(tokens)
        cut = stop_index(text)
        if on_text is not None:
            # Hold back text that may still become a stop string, and partial UTF-8 characters.
            hold = max((len(s) for s in cfg.stop), default=1) - 1
            end = cut if cut is not None else len(text) - hold
            piece = text[shown[row]:max(shown[row], end)].rstrip("\ufffd")
            if piece:
                on_text(row, piece)
                shown[row] += len(piece)
        return cut is not None

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    watch = should_stop if (cfg.stop or on_text is not None) else None
    new = generate(model, encoded, cfg, eos_id=tokenizer.eos_id, pad_id=pad, should_stop=watch)
    results = []
    for row, tokens in enumerate(new):
        text = decoded(tokens)
        cut = stop_index(text)
        cut = len(text) if cut is None else cut
        if on_text is not None and shown[row] < cut:
            on_text(row, text[shown[row]:cut])
        results.append(text[:cut])
    return results


def infill(model: CausalLM, tokenizer: Tokenizer, prefix: str, suffix: str,
           cfg: SamplingConfig | None = None) -> str:
    """The text between `prefix` and `suffix`, from a model pre-trained with `--objective fim` (the prompt is PSM or
    SPM as its tokenizer records). The middle ends at EOS, at a FIM token (the model starting another document), at
    a stop string, or after max_new_tokens."""
    cfg = cfg or SamplingConfig()
    if isinstance(model, (MaskedLM, Seq2SeqLM)):
        raise UserError(f"a {type(model).__name__} cannot fill in the middle; use a causal model pre-trained with "
                        "`lmforge pretrain --objective fim`")
    prompt = infill_prompt(tokenizer, prefix, suffix)
    ends = set(require_fim(tokenizer))

    def cut(text: str) -> str:
        return text[:min((text.index(s) for s in cfg.stop if s in text), default=len(text))]

    def should_stop(row: int, tokens: list[int]) -> bool:
        return tokens[-1] in ends or (bool(cfg.stop) and cut(tokenizer.decode(tokens)) != tokenizer.decode(tokens))

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    new = generate(model, [prompt], dataclasses.replace(cfg, stop_at_eos=True), eos_id=tokenizer.eos_id, pad_id=pad,
                   should_stop=should_stop)[0]
    return cut(tokenizer.decode([t for t in new if t not in ends], skip_special_tokens=True))


@torch.inference_mode()
def fill_mask(model: MaskedLM, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """An encoder's answer to a cloze: for each [MASK] in `text`, its top_k (token, probability) guesses."""
    if tokenizer.mask_id is None:
        raise UserError("this tokenizer has no mask token; fill-mask needs a masked-LM (e.g. WordPiece) tokenizer")
    ids = tokenizer.encode_for_encoder(text, model.token_room)
    positions = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    if not positions:
        mask = tokenizer.specials["mask"]
        raise UserError(f"the text has no {mask} to fill; write {mask} where a word should be guessed")
    model.eval()
    logits = model(torch.tensor([ids], device=model.embed.weight.device)).logits[0, positions]
    best = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    return [[(tokenizer.decode([token]), prob) for token, prob in zip(row_ids.tolist(), row_p.tolist(), strict=True)]
            for row_ids, row_p in zip(best.indices, best.values, strict=True)]
