"""Building blocks: attention, positions, norms, MLPs, the residual block. No training logic."""

from lmforge.nn.attention import Attention, KVCache, reference_attention
from lmforge.nn.block import Block
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import RMSNorm, make_norm
from lmforge.nn.positions import Rotary, SinusoidalPositions, apply_rotary, sinusoidal_table

__all__ = [
    "MLP", "Attention", "Block", "KVCache", "RMSNorm", "Rotary", "SinusoidalPositions",
    "apply_rotary", "make_norm", "reference_attention", "sinusoidal_table",
]
