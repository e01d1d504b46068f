"""Tokenizers: byte-level BPE and char-level, both stored as HF `tokenizer.json`.

The algorithms are HF `tokenizers`; lmforge adds the special-token roles (kept in
`tokenizer_config.json`, as HF does), training from the same corpus readers as the data
pipeline, and a small typed interface the rest of the code uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import UserError

DEFAULT_SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the ids of its special tokens."""

    def __init__(self, backend: HFTokenizer, specials: dict[str, str] | None = None,
                 config: dict | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})  # the rest of tokenizer_config.json (chat template, ...), kept verbatim
        self.specials = {role: tok for role, tok in (specials or {}).items() if tok is not None}
        for role, token in self.specials.items():
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
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- files -----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (HF field names) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.update({f"{role}_token": token for role, token in self.specials.items()})
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding `tokenizer.json` (and optionally `tokenizer_config.json`) or the file."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at '{path}'; train one with `lmforge tokenizer train` or pass its folder")
        backend = HFTokenizer.from_file(str(file))
        config_file = file.parent / TOKENIZER_CONFIG_FILE
        specials, config = {}, {}
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            for role in DEFAULT_SPECIALS:
                token = config.get(f"{role}_token")
                if isinstance(token, dict):  # HF AddedToken serialisation
                    token = token.get("content")
                if token is not None:
                    specials[role] = token
        return cls(backend, specials, config)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")


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
