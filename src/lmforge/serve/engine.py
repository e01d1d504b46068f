"""Continuous batching: one background thread decodes every running request together, one token per step.

A request is prefilled alone (its prompt's keys/values computed in a cache of its own, the same forward
`lmforge.generate` runs for one prompt), then its keys/values are copied into a free slot of the shared
batch cache and it decodes with the others until its stop rule, its max_tokens or EOS ends it; its slot
is then free for the next request. A long request therefore never holds a short one back.

The shared cache has one write column for every row (`KVCache` keeps one length). Each row's tokens
sit right-aligned against that column, with the columns before them hidden by the attention mask, so
position ids (counted from the mask) and masks are right per row, exactly as for left-padded prompts
in `lmforge.generate`. A joining prompt longer than the filled part shifts the batch right; when the
write column reaches the end of the cache, columns that no running row uses are cut from the left.

Sampling is `lmforge.generate.next_tokens` on each row's own logits with the row's own settings and,
when seeded, its own `torch.Generator`: a seeded request gives the same text alone or in a batch.

Seq2seq models and models with a soft prompt (whose virtual tokens this layout cannot place per row)
are served one request at a time through `lmforge.generate.generate` instead, on the same thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate, next_tokens
from lmforge.models import CausalLM, Seq2SeqLM
from lmforge.nn import KVCache
from lmforge.tokenizer import Tokenizer


class QueueFull(Exception):
    """More requests wait than the engine's max_queue allows (the server answers 429)."""


class ShuttingDown(Exception):
    """The engine was stopped and takes no new requests (the server answers 503)."""


@dataclass
class Finished:
    """How one request ended: its text (stop string cut off), token counts and OpenAI's finish_reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context)


@dataclass
class Request:
    """One sequence to generate. `on_text(piece)` streams text; `on_done(Finished | Exception)` ends it.

    Both are called on the engine thread: a caller on an event loop hands them on thread-safely.
    """

    prompt_ids: list[int]
    sampling: SamplingConfig
    on_text: Callable[[str], None]
    on_done: Callable[[Finished | Exception], None]
    repetition_penalty: float = 1.0
    cancelled: bool = False  # set by the caller (client went away): the engine drops the request

    def cancel(self) -> None:
        self.cancelled = True


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as HF applies it): a token already in the sequence has its logit divided by
    `penalty` when positive, multiplied when negative. logits (1, V), seen: ids of the sequence so far."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen[None])
    return logits.scatter(-1, seen[None], torch.where(picked > 0, picked / penalty, picked * penalty))


class _Text:
    """Stop strings and streamed text of one sequence, as `lmforge.generate.generate_text` handles them:
    text that may still grow into a stop string, and partial UTF-8 characters, are held back."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.shown = 0
        self.cut: int | None = None

    def push(self, token: int) -> bool:
        """Add a generated token; True when a stop string has appeared."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.cut = min((text.index(s) for s in self.stop if s in text), default=None)
        end = self.cut if self.cut is not None else len(text) - self.hold
        piece = text[self.shown:max(self.shown, end)].rstrip("\ufffd")
        if piece:
            self.on_text(piece)
            self.shown += len(piece)
        return self.cut is not None

    def final(self) -> str:
        """The whole text, stop string cut off; streams whatever was held back."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.index(s) for s in self.stop if s in text), default=len(text))
        if self.shown < cut:
            self.on_text(text[self.shown:cut])
            self.shown = cut
        return text[:cut]


@dataclass
class _Row:
    """A request in the running batch."""

    request: Request
    text: _Text
    budget: int
    generator: torch.Generator | None
    seen: torch.Tensor  # prompt + generated ids (for the repetition penalty)
    cached: int = 0  # tokens of this row in the batch cache
    pending: int = 0  # the last chosen token, fed at the next step
    reason: str | None = None
    extra: dict = field(default_factory=dict)


class _SlotCache(KVCache):
    """The first `rows` slots of the engine's batch cache, viewed as a KVCache for one forward (no copy)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int) -> None:
        self.keys, self.values = keys[:, :rows], values[:, :rows]
        self.max_len, self.length, self.cross = keys.shape[3], length, {}


class Engine:
    """The decode loop. `submit` queues a request (QueueFull past max_queue, ShuttingDown after `stop`)."""

    def __init__(self, model: CausalLM | Seq2SeqLM, tokenizer: Tokenizer, max_batch: int = 16,
                 max_queue: int = 256, start: bool = True) -> None:
        if not isinstance(model, (CausalLM, Seq2SeqLM)):
            raise UserError(f"a {type(model).__name__} does not generate text; serve a causal or seq2seq checkpoint")
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        # Continuous batching needs the plain causal layout; the rest decodes one request at a time.
        # one KV-cache slot per request: transformers only (a recurrent model decodes one request at a time)
        self.batched = isinstance(model, CausalLM) and model.virtual_tokens == 0 and model.cfg.arch == "transformer"
        self.device = model.embed.weight.device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.eos_id = tokenizer.eos_id
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Condition()
        self._stopped = False
        self._rows: list[_Row] = []
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (with how many rows: `batch_sizes`), for tests and benchmarks
        self.batch_sizes: list[int] = []
        if self.batched:
            cache = model.new_cache(max_batch, model.token_room)
            self._keys, self._values = cache.keys, cache.values
            self._mask = torch.zeros(max_batch, model.token_room, dtype=torch.long, device=self.device)
            self._length = 0  # filled columns of the batch cache
        if start:
            self.start()

    # -- the caller's side -----------------------------------------------------------------------
    @property
    def room(self) -> int:
        """Prompt plus new tokens that fit one sequence."""
        return self.model.token_room

    def budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """New tokens a request may have: max_new_tokens, less what the context cannot hold (as `generate`)."""
        if isinstance(self.model, Seq2SeqLM):
            return max_new_tokens if self.model.cfg.positions == "relative" else min(
                max_new_tokens, self.model.cfg.context_length - 1)
        return min(max_new_tokens, self.room - prompt_tokens)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids as `lmforge.generate.generate_text` makes them (an encoder input ends with EOS; an
        empty causal prompt becomes BOS), so that served and `lmforge generate` outputs agree."""
        if isinstance(self.model, Seq2SeqLM):
            return self.tokenizer.encode(text, add_eos=True)
        bos = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0
        return self.tokenizer.encode(text) or [bos]

    def submit(self, request: Request) -> None:
        if self._stopped:
            raise ShuttingDown("the server is shutting down")
        if self._waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self._waiting.qsize()} requests are waiting, the most this server queues "
                            f"(--max_queue {self.max_queue}); retry later")
        self._waiting.put(request)
        with self._wake:
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the running and queued ones finish, then end the thread."""
        self._stopped = True
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._rows and self._waiting.empty():
                        if self._stopped:
                            return
                        self._wake.wait(0.5)
                try:
                    if self.batched:
                        self._admit()
                        if self._rows:
                            self._step()
                    else:
                        self._one_by_one(self._waiting.get())
                except Exception as exc:  # a bug must not kill the loop: fail the requests it touched
                    for row in self._rows:
                        row.request.on_done(exc)
                    self._rows.clear()
                    if self.batched:
                        self._length = 0

    def _new_row(self, request: Request) -> _Row:
        cfg = request.sampling
        budget = self.budget(len(request.prompt_ids), cfg.max_new_tokens)
        generator = None
        if cfg.seed is not None and not cfg.is_greedy:  # as `generate`: the same stream for the same seed
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        seen = torch.tensor(request.prompt_ids, device=self.device)
        return _Row(request, _Text(self.tokenizer, cfg.stop, request.on_text), budget, generator, seen)

    def _admit(self) -> None:
        """Prefill waiting requests into free slots (each alone, as `generate` prefills one prompt)."""
        while len(self._rows) < self.max_batch and not self._waiting.empty():
            request = self._waiting.get()
            if request.cancelled:
                continue
            row = self._new_row(request)
            prompt = len(request.prompt_ids)
            cache = self.model.new_cache(1, prompt)
            ids = torch.tensor([request.prompt_ids], device=self.device)
            logits = self.model(ids, cache=cache, last_only=True).logits[:, -1]
            if self._choose(row, logits):
                self._finish(row)
                continue
            self._insert(row, cache)

    def _insert(self, row: _Row, cache: KVCache) -> None:
        """Put a prefilled row into the next free slot, right-aligned with the batch's write column."""
        prompt, slot = cache.length, len(self._rows)
        if self._length + 1 > self._keys.shape[3]:
            self._compact()
        if prompt > self._length:  # shift the running rows right to make room in front of the column
            shift, length = prompt - self._length, self._length
            for t in (self._keys, self._values):
                t[:, :slot, :, shift:shift + length] = t[:, :slot, :, :length].clone()
            self._mask[:slot, shift:shift + length] = self._mask[:slot, :length].clone()
            self._mask[:slot, :shift] = 0
            self._length = prompt
        start = self._length - prompt
        self._keys[:, slot, :, start:self._length] = cache.keys[:, 0, :, :prompt]
        self._values[:, slot, :, start:self._length] = cache.values[:, 0, :, :prompt]
        self._mask[slot].zero_()
        self._mask[slot, start:self._length] = 1
        row.cached = prompt
        self._rows.append(row)

    def _compact(self) -> None:
        """Cut the columns in front of every running row's tokens (the cache is full up to its end)."""
        keep = max(row.cached for row in self._rows)
        shift, rows = self._length - keep, len(self._rows)
        for t in (self._keys, self._values):
            t[:, :rows, :, :keep] = t[:, :rows, :, shift:self._length].clone()
        self._mask[:rows, :keep] = self._mask[:rows, shift:self._length].clone()
        self._length = keep

    def _step(self) -> None:
        """Feed every row its pending token, choose the next ones, retire finished rows."""
        for index in reversed(range(len(self._rows))):
            if self._rows[index].request.cancelled:  # the client went away: free its slot
                self._rows[index].request.on_done(ShuttingDown("cancelled"))
                self._release(index)
        if not self._rows:
            self._length = 0
            return
        if self._length + 1 > self._keys.shape[3]:
            self._compact()
        rows, length = len(self._rows), self._length
        self._mask[:rows, length] = 1
        tokens = torch.tensor([[row.pending] for row in self._rows], device=self.device)
        cache = _SlotCache(self._keys, self._values, rows, length)
        logits = self.model(tokens, attention_mask=self._mask[:rows, :length + 1], cache=cache,
                            last_only=True).logits[:, -1]
        self._length += 1
        self.steps += 1
        self.batch_sizes.append(rows)
        done = []
        for index, row in enumerate(self._rows):
            row.cached += 1
            if self._choose(row, logits[index:index + 1]):
                done.append(index)
        for index in reversed(done):
            self._finish(self._rows[index])
            self._release(index)
        if not self._rows:
            self._length = 0

    def _release(self, index: int) -> None:
        """Free slot `index`: the last row moves into it, so running rows stay in slots 0..n-1."""
        last = len(self._rows) - 1
        if index != last:
            for t in (self._keys, self._values):
                t[:, index] = t[:, last]
            self._mask[index] = self._mask[last]
            self._rows[index] = self._rows[last]
        self._rows.pop()

    def _choose(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token from its (1, V) logits and record it; True when the row is done."""
        request = row.request
        if request.cancelled:
            row.reason = "cancelled"
            return True
        logits = apply_repetition_penalty(logits, row.seen, request.repetition_penalty)
        token = int(next_tokens(logits, request.sampling, row.generator)[0])
        if request.sampling.stop_at_eos and token == self.eos_id:
            row.reason = "stop"
            return True
        row.pending = token
        if request.repetition_penalty != 1.0:
            row.seen = torch.cat([row.seen, row.seen.new_tensor([token])])
        if row.text.push(token):
            row.reason = "stop"
        elif len(row.text.tokens) >= row.budget:
            row.reason = "length"
        return row.reason is not None

    def _finish(self, row: _Row) -> None:
        if row.reason == "cancelled":
            row.request.on_done(ShuttingDown("cancelled"))
            return
        text = row.text.final()
        row.request.on_done(Finished(text, len(row.request.prompt_ids), len(row.text.tokens), row.reason or "stop"))

    def _one_by_one(self, request: Request) -> None:
        """Seq2seq (and soft-prompt) models: `lmforge.generate.generate` for this request alone."""
        if request.cancelled:
            return
        try:
            if request.repetition_penalty != 1.0:
                raise UserError("repetition_penalty is served for causal models only; leave it at 1")
            row = self._new_row(request)
            tokens = generate(self.model, [request.prompt_ids], request.sampling, eos_id=self.eos_id,
                              pad_id=self.pad_id,
                              should_stop=lambda _, new: row.text.push(new[-1]) or request.cancelled)[0]
        except Exception as exc:
            request.on_done(exc)
            return
        if request.cancelled:
            request.on_done(ShuttingDown("cancelled"))
            return
        stopped = row.text.cut is not None or len(tokens) < row.budget
        row.reason = "stop" if stopped else "length"
        self._finish(row)
