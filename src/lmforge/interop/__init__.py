"""Other formats lmforge speaks (Hugging Face). Sits above the models; nothing below imports it."""

from lmforge.interop.hf import architecture_of, from_hf_state_dict, hf_config, to_hf_state_dict

__all__ = ["architecture_of", "from_hf_state_dict", "hf_config", "to_hf_state_dict"]
