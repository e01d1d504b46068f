"""Corpora → token shards → batches."""

from lmforge.data.batches import RandomWindows
from lmforge.data.corpus import STDLIB, read_documents, resolve_files, stdlib_files
from lmforge.data.objectives import MaskedWindows, SpanCorruptionBatches, mask_tokens, span_corruption
from lmforge.data.preferences import PreferencePair, ranking_to_pairs, read_hh_rlhf, read_pairs, write_pairs
from lmforge.data.shards import TokenShard, build_shard, load_shard

__all__ = [
    "STDLIB", "MaskedWindows", "PreferencePair", "RandomWindows", "SpanCorruptionBatches", "TokenShard", "build_shard",
    "load_shard",
    "mask_tokens", "ranking_to_pairs", "read_documents", "read_hh_rlhf", "read_pairs", "resolve_files",
    "span_corruption", "stdlib_files", "write_pairs",
]
