"""What every picture needs: the prompt as model input (with its length checked), readable token labels,
and a figure saved to a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from lmforge.errors import UserError
from lmforge.models import Encoder, Model, Seq2SeqLM
from lmforge.tokenizer import Tokenizer

# Shown in place of characters that would be invisible or break a label.
_VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "$": r"\$"})


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as an axis label: spaces and newlines made visible, control characters escaped, long pieces
    shortened. A byte-level piece that is not whole UTF-8 on its own shows as its vocabulary entry."""
    text = tokenizer.decode([token_id])
    if not text or "\ufffd" in text:
        text = tokenizer.backend.id_to_token(token_id) or f"#{token_id}"
    text = "".join(c if c.isprintable() or c in " \n\t" else f"\\x{ord(c):02x}" for c in text).translate(_VISIBLE)
    return text if len(text) <= 12 else text[:11] + "…"


def prompt_ids(model: Model, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt framed as the model reads it: an encoder's [CLS] … [SEP], an encoder-decoder's input with EOS,
    a decoder's plain ids (BOS when the prompt is empty). Longer than the context → a one-line error."""
    if isinstance(model, Encoder):
        ids = tokenizer.encode_for_encoder(prompt)
    elif isinstance(model, Seq2SeqLM):
        ids = tokenizer.encode(prompt, add_eos=True)
    else:
        ids = tokenizer.encode(prompt) or [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
    room = getattr(model, "token_room", None)
    if room is not None and len(ids) > room:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's {model.room_text}; "
                        "shorten --prompt")
    return ids


def save_figure(fig: Figure, png: str | Path) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
