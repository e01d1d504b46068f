"""What every align recipe does first: load a causal policy (or reference) together with its tokenizer."""

from __future__ import annotations

import torch

from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.tokenizer import Tokenizer


def load_causal(path: str, what: str, purpose: str, device: torch.device | None = None
                ) -> tuple[CausalLM, Tokenizer]:
    """The causal LM at `path` and its tokenizer; `what` names the option (e.g. --model) and `purpose` the
    command (e.g. DPO) in the one-line errors for another family or a missing tokenizer."""
    model, tokenizer = load(path, device) if device is not None else load(path)
    if not isinstance(model, CausalLM):
        raise UserError(f"{what} '{path}' is a {model.cfg.family} model ({type(model).__name__}); {purpose} needs a "
                        "causal language model")
    if tokenizer is None:
        raise UserError(f"{what} '{path}' has no tokenizer.json; {purpose} needs the model's tokenizer")
    return model, tokenizer
