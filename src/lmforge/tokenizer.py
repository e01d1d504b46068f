"""Tokenizers: byte-level BPE, char-level, WordPiece (BERT) and Unigram (T5), all stored as HF `tokenizer.json`.

The algorithms are HF `tokenizers`; lmforge adds the special-token roles (kept in
`tokenizer_config.json`, as HF does), training from the same corpus readers as the data
pipeline, and a small typed interface the rest of the code uses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import UserError
from lmforge.files import read_json_object, read_text

DEFAULT_SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")  # each stored as `{role}_token`, HF's field names
# BERT's order puts [PAD] at id 0, so zero-initialised buffers read as padding.
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
UNIGRAM_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}  # T5's ids 0, 1, 2
SENTINEL = "<extra_id_{}>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the ids of its special tokens."""

    def __init__(self, backend: HFTokenizer, specials: dict[str, str] | None = None,
                 config: dict | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})  # the rest of tokenizer_config.json (chat template, ...), kept verbatim
        self.specials = {role: tok for role, tok in (specials or {}).items() if tok is not None}
        for role, token in self.specials.items():
            if role not in ROLES:  # save/load only know ROLES, so another role would silently vanish
                raise UserError(f"unknown special-token role '{role}'; use one of {', '.join(ROLES)}")
            if backend.token_to_id(token) is None:
                raise UserError(f"special token {role}='{token}' is not in the tokenizer's vocabulary")

    # -- special tokens --------------------------------------------------------------------------
    def _special_id(self, role: str) -> int | None:
        token = self.specials.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk")

    @property
    def cls_id(self) -> int | None:
        return self._special_id("cls")

    @property
    def sep_id(self) -> int | None:
        return self._special_id("sep")

    @property
    def mask_id(self) -> int | None:
        return self._special_id("mask")

    @property
    def special_ids(self) -> list[int]:
        """Sorted ids of every special token: the roles plus the backend's other special added tokens (sentinels)."""
        added = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        roles = {self._special_id(role) for role in self.specials}
        return sorted(added | roles)

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of `<extra_id_0>`, `<extra_id_1>`, ... in that order (T5's span-corruption sentinels)."""
        ids = []
        while (i := self.backend.token_to_id(SENTINEL.format(len(ids)))) is not None:
            ids.append(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        with self._naming_unencodable([text]):
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_for_encoder(self, text: str, max_length: int | None = None) -> list[int]:
        """`text` framed for a bidirectional encoder: [CLS] ids [SEP], else <s> ids </s> (either may be absent).

        With `max_length`, the text's ids are cut from the end so the framed sequence fits.
        """
        if self.cls_id is not None and self.sep_id is not None:
            head, tail = [self.cls_id], [self.sep_id]
        else:
            head = [] if self.bos_id is None else [self.bos_id]
            tail = [] if self.eos_id is None else [self.eos_id]
        ids = self.encode(text)
        if max_length is not None:
            room = max_length - len(head) - len(tail)
            if room < 0:
                raise UserError(f"max_length={max_length} cannot hold the {len(head) + len(tail)} framing special "
                                f"tokens; use max_length >= {len(head) + len(tail)}")
            ids = ids[:room]
        return [*head, *ids, *tail]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        with self._naming_unencodable(texts):
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @contextlib.contextmanager
    def _naming_unencodable(self, texts: list[str]) -> Iterator[None]:
        """tokenizers raises a bare Exception when a vocabulary without an unknown token meets a piece it lacks:
        turn that into a UserError naming the characters (anything more specific is a caller's bug: re-raised)."""
        try:
            yield
        except Exception as exc:
            if type(exc) is not Exception:
                raise
            vocab = self.backend.get_vocab()
            unknown = sorted({ch for text in texts for ch in text if ch not in vocab})[:10]
            which = f" ({', '.join(map(repr, unknown))})" if unknown else ""
            raise UserError(f"the text holds characters{which} this tokenizer has no token for, and it has no unknown "
                            f"token ({exc}); a char-level tokenizer knows only its training corpus's characters: "
                            "leave them out or train the tokenizer on text that has them") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- files -----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (HF field names) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.update({f"{role}_token": self.specials[role] for role in ROLES if role in self.specials})
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding `tokenizer.json` (and optionally `tokenizer_config.json`) or the file."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at '{path}'; train one with `lmforge tokenizer train` or pass its folder")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for whatever it cannot parse
            raise UserError(f"'{file}' is not a tokenizer the tokenizers library can read ({exc}); train one with "
                            "`lmforge tokenizer train` or copy the file again") from None
        # Some shipped tokenizer.json files pad and truncate every encoding (MiniLM's: to 128 tokens);
        # lmforge pads per batch and truncates explicitly, so those settings would only corrupt ids.
        backend.no_padding()
        backend.no_truncation()
        config_file = file.parent / TOKENIZER_CONFIG_FILE
        specials, config = {}, {}
        if config_file.is_file():
            config = read_json_object(config_file, "tokenizer config", "fix it or copy the file again")
            for role in ROLES:
                token = config.get(f"{role}_token")
                if isinstance(token, dict):  # HF AddedToken serialisation
                    token = token.get("content")
                if token is not None:
                    specials[role] = token
        template = file.parent / CHAT_TEMPLATE_FILE  # transformers 5 keeps the chat template in its own file
        if not config.get("chat_template") and template.is_file():
            config["chat_template"] = read_text(template, "chat template")
        return cls(backend, specials, config)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A conversation as one prompt: through the model's chat template (jinja2, sandboxed, as HF renders
        it) when the tokenizer has one, else through DEFAULT_CHAT_FORMAT ("User: ...", "Assistant: ...").

        Each message is {"role": ..., "content": str}; with add_generation_prompt the text ends where the
        assistant's reply begins.
        """
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise UserError(f"chat message {number} must be {{'role': str, 'content': str}}; got {message!r:.80}")
        if not messages:
            raise UserError("a chat needs at least one message; give a user message")
        if not self.chat_template:
            turns = "".join(_default_turn(m["role"], m["content"]) + "\n" for m in messages)
            return turns + (DEFAULT_CHAT_FORMAT["assistant"].format("").rstrip() if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:  # what HF templates call to refuse a conversation
            raise UserError(f"the chat template refuses this conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.specials.get("bos", ""), eos_token=self.specials.get("eos", ""))
        except TemplateError as exc:
            raise UserError(f"the tokenizer's chat_template cannot render this conversation ({exc}); "
                            "fix chat_template in tokenizer_config.json") from None


# The plain chat layout for models without a chat template; a reply ends where the next user turn would begin.
DEFAULT_CHAT_FORMAT = {"system": "System: {}", "user": "User: {}", "assistant": "Assistant: {}"}
DEFAULT_CHAT_STOP = "\nUser:"


def _default_turn(role: str, content: str) -> str:
    if role not in DEFAULT_CHAT_FORMAT:
        raise UserError(f"chat role '{role}' is not one of {', '.join(DEFAULT_CHAT_FORMAT)} (the default chat "
                        "format knows only these); use one of them or a tokenizer with a chat_template")
    return DEFAULT_CHAT_FORMAT[role].format(content)


def train_bpe(texts: Iterator[str], vocab_size: int = 4096, specials: dict[str, str] | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every UTF-8 string round-trips exactly, no unknown tokens."""
    specials = DEFAULT_SPECIALS if specials is None else specials
    if vocab_size < 256 + len(specials):
        raise UserError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least {256 + len(specials)}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, specials)


def train_char(texts: Iterable[str], specials: dict[str, str] | None = None) -> Tokenizer:
    """One token per Unicode character seen in `texts` (ids in sorted character order, as nanoGPT)."""
    specials = {} if specials is None else specials
    alphabet = sorted(set().union(*(set(t) for t in texts)))
    if not alphabet:
        raise UserError("cannot build a char-level tokenizer from an empty corpus; check the data sources")
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in specials.values():
        vocab.setdefault(token, len(vocab))
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=specials.get("unk")))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials.values()))
    return Tokenizer(backend, specials)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """BERT-style WordPiece: Unicode cleanup (optionally lowercased), split on whitespace and punctuation.

    No post-processor: `encode` stays raw and `encode_for_encoder` adds [CLS] ... [SEP].
    """
    specials = WORDPIECE_SPECIALS
    if vocab_size <= len(specials):
        raise UserError(f"vocab_size={vocab_size} is too small for WordPiece; use at least {len(specials) + 1}")
    backend = HFTokenizer(models.WordPiece(unk_token=specials["unk"]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials.values()),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    _require_learned_pieces(backend, specials, "WordPiece")
    return Tokenizer(backend, specials)


def train_unigram(texts: Iterable[str], vocab_size: int = 8000, num_sentinels: int = 100) -> Tokenizer:
    """T5-style Unigram (SentencePiece-like, "▁" marks word starts) plus `<extra_id_i>` span sentinels.

    `vocab_size` counts the sentinels. As in T5, they take the top ids with `<extra_id_0>` last.
    """
    specials = UNIGRAM_SPECIALS
    if num_sentinels < 0:
        raise UserError(f"num_sentinels={num_sentinels} is negative; use 0 or more")
    pieces = vocab_size - num_sentinels
    if pieces <= len(specials):
        raise UserError(f"vocab_size={vocab_size} cannot hold {len(specials)} special tokens, {num_sentinels} "
                        f"sentinels and any learned piece; use at least {len(specials) + num_sentinels + 1}")
    backend = HFTokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    # "first" (HF's non-legacy T5) marks only the text's start, so text right after a sentinel round-trips.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=pieces,
        special_tokens=list(specials.values()),  # trainer order gives <pad>=0, </s>=1, <unk>=2
        unk_token=specials["unk"],
        show_progress=False,
    )
    try:
        backend.train_from_iterator(texts, trainer=trainer)
    except Exception as e:  # the Rust trainer raises a bare Exception when every character cannot fit
        if "not large enough" not in str(e):
            raise
        raise UserError(f"vocab_size={vocab_size} leaves {pieces} pieces, fewer than the corpus has characters; "
                        "use a larger vocab_size") from e
    _require_learned_pieces(backend, specials, "Unigram")
    # Added special tokens are matched before the model sees the text, so a sentinel never splits.
    backend.add_special_tokens([SENTINEL.format(i) for i in reversed(range(num_sentinels))])
    return Tokenizer(backend, specials)


def _require_learned_pieces(backend: HFTokenizer, specials: dict[str, str], kind: str) -> None:
    if backend.get_vocab_size() <= len(specials):
        raise UserError(f"cannot train a {kind} tokenizer from an empty corpus; check the data sources")
