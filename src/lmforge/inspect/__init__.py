"""Seeing inside a model: attention maps, what sampling rules keep, position patterns, embedding PCAs and
training curves as PNGs (`lmforge inspect`), and a self-contained HTML report of a run (`lmforge report`)."""

from lmforge.inspect.attention import AttentionMap, attention_maps, draw_attention, plot_attention
from lmforge.inspect.curves import draw_loss, draw_throughput, read_metrics
from lmforge.inspect.embeddings import draw_embeddings, pca_2d, read_word2vec
from lmforge.inspect.positions import draw_positions, rope_scores
from lmforge.inspect.sampling import RuleEffect, draw_sampling, next_token_logits, rule_effects

__all__ = [
    "AttentionMap", "RuleEffect", "attention_maps", "draw_attention", "draw_embeddings", "draw_loss",
    "draw_positions", "draw_sampling", "draw_throughput", "next_token_logits", "pca_2d", "plot_attention",
    "read_metrics", "read_word2vec", "rope_scores", "rule_effects",
]
