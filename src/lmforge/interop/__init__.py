"""Other formats lmforge speaks (Hugging Face). Sits above the models; nothing below imports it."""

from lmforge.interop.folders import is_hf_folder, load, load_hf, read_hf_weights, save_hf
from lmforge.interop.hf import architecture_of, config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict

__all__ = [
    "architecture_of", "config_from_hf", "from_hf_state_dict", "hf_config", "is_hf_folder", "load", "load_hf",
    "read_hf_weights", "save_hf", "to_hf_state_dict",
]
