"""Corpora → token shards → batches."""

from lmforge.data.batches import RandomWindows
from lmforge.data.corpus import STDLIB, read_documents, resolve_files, stdlib_files
from lmforge.data.shards import TokenShard, build_shard, load_shard

__all__ = [
    "STDLIB", "RandomWindows", "TokenShard", "build_shard", "load_shard", "read_documents",
    "resolve_files", "stdlib_files",
]
