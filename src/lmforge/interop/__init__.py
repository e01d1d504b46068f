"""Other formats lmforge speaks (Hugging Face). Sits above the models; nothing below imports it."""

from lmforge.interop.folders import is_hf_folder, load, load_hf, read_hf_weights, save_hf
from lmforge.interop.hf import (
    SUPPORTED_TYPES,
    architecture_of,
    config_from_hf,
    from_hf_state_dict,
    generation_config,
    hf_config,
    hf_weight_names,
    tie_from_weights,
    to_hf_state_dict,
)

__all__ = [
    "SUPPORTED_TYPES", "architecture_of", "config_from_hf", "from_hf_state_dict", "generation_config", "hf_config",
    "hf_weight_names", "is_hf_folder", "load", "load_hf", "read_hf_weights", "save_hf", "tie_from_weights",
    "to_hf_state_dict",
]
