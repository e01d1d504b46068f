"""Building blocks: attention, positions, norms, MLPs, the residual block, stacks. No training logic."""

from lmforge.nn.attention import Attention, CrossAttention, KVCache, reference_attention
from lmforge.nn.block import Block
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import RMSNorm, make_norm
from lmforge.nn.positions import (
    Positions,
    RelativePositionBias,
    Rotary,
    SinusoidalPositions,
    apply_rotary,
    relative_bucket,
    sinusoidal_table,
)
from lmforge.nn.stack import TransformerStack

__all__ = [
    "MLP", "Attention", "Block", "CrossAttention", "KVCache", "Positions", "RMSNorm", "RelativePositionBias",
    "Rotary", "SinusoidalPositions", "TransformerStack", "apply_rotary", "make_norm", "reference_attention",
    "relative_bucket", "sinusoidal_table",
]
