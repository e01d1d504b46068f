"""Alignment from preferences: log-probs of completions, reward models, DPO (and PPO/GRPO, Constitutional AI).

Kept light on import: the submodules are imported where they are used.
"""

from lmforge.align.logprobs import completion_logprobs, pack_pairs, scoring_mode, sequence_logprob

__all__ = ["completion_logprobs", "pack_pairs", "scoring_mode", "sequence_logprob"]
