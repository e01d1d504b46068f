"""Model families composed from `lmforge.nn`."""

from lmforge.models.causal import IGNORE_INDEX, CausalLM, LMOutput

__all__ = ["IGNORE_INDEX", "CausalLM", "LMOutput"]
