"""The three transformer families, composed from `lmforge.nn`, and `build_model` to pick one."""

from lmforge.config import ModelConfig
from lmforge.models.base import IGNORE_INDEX, LMOutput, Model
from lmforge.models.causal import CausalClassifier, CausalLM
from lmforge.models.encoder import (
    Encoder,
    MaskedLM,
    SequenceClassifier,
    TokenClassifier,
    classifier_from,
    embed_texts,
    mean_pool,
)
from lmforge.models.recurrent import RecurrentLM
from lmforge.models.seq2seq import Seq2SeqLM

ENCODER_HEADS: dict[str, type[Encoder]] = {
    "lm": MaskedLM, "none": Encoder, "sequence": SequenceClassifier, "token": TokenClassifier,
}


def model_class(cfg: ModelConfig) -> type[Model]:
    """The class a config describes: its family (a recurrent arch is causal), and for encoders its head."""
    if cfg.family == "causal" and cfg.head == "sequence":
        return CausalClassifier
    if cfg.arch != "transformer":
        return RecurrentLM
    if cfg.family == "masked":
        return ENCODER_HEADS[cfg.head]
    return Seq2SeqLM if cfg.family == "seq2seq" else CausalLM


def build_model(cfg: ModelConfig) -> Model:
    return model_class(cfg)(cfg)


__all__ = [
    "ENCODER_HEADS", "IGNORE_INDEX", "CausalClassifier",
    "CausalLM", "Encoder", "LMOutput", "MaskedLM", "Model", "RecurrentLM", "Seq2SeqLM",
    "SequenceClassifier", "TokenClassifier", "build_model", "classifier_from", "embed_texts", "mean_pool",
    "model_class",
]
