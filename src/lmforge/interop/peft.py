"""LoRA adapters in the Hugging Face `peft` format: adapter_config.json + adapter_model.safetensors,
tensors named after the HF modules (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

Only name and shape bookkeeping (peft is never imported). lmforge's fused Linears make the mapping
a matter of rows: an HF module is a row range of an lmforge Linear (q_proj = the q rows of `qkv`;
GPT-2's c_attn = all of them). An HF module's LoRA is then every lmforge update overlapping its rows:
A stacked, B block-diagonal (each update's rows and rank columns), which is exact — e.g. LoRA on q and
v of a GPT-2 becomes one rank-2r c_attn LoRA, and a whole-`qkv` LoRA on a Llama three q/k/v LoRAs
sharing A. Ranks or alphas that differ from the most common go into peft's rank/alpha patterns.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoint import read_safetensors, write_atomically
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.interop.hf import architecture_of
from lmforge.nn import Block
from lmforge.peft.lora import LoraConfig, LoraUpdate, Site, apply_lora, lora_layers, lora_sites
from lmforge.peft.methods import STATE_CONFIG, load_method_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
GPT2_MODULES = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}
LLAMA_MODULES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                 "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def hf_lora_modules(model: nn.Module) -> dict[str, str]:
    """HF module name (e.g. model.layers.0.self_attn.q_proj) → lmforge LoRA site key (decoder.blocks.0.q)."""
    cfg = model.cfg
    if cfg.family != "causal":
        raise UserError(f"peft adapters are supported for causal LMs (GPT-2, Llama family); this is a {cfg.family} "
                        "model — use save_method_state for lmforge's own adapter format")
    gpt2 = architecture_of(cfg) == "gpt2"
    layer, names = ("transformer.h.{}.", GPT2_MODULES) if gpt2 else ("model.layers.{}.", LLAMA_MODULES)
    return {layer.format(i) + theirs: f"decoder.blocks.{i}.{ours}" for i in range(cfg.n_layers)
            for theirs, ours in names.items()}


# -- lmforge → peft ------------------------------------------------------------------------------


def _combine(parts: list[LoraUpdate], site: Site) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One (A, B, scaling) equal to the sum of `parts` restricted to the site's rows."""
    scaling = parts[0].scaling
    a = torch.cat([u.A.detach().float() for u in parts])
    b = torch.zeros(site.stop - site.start, a.shape[0], device=a.device)
    col = 0
    for u in parts:
        lo, hi, rank = max(u.start, site.start), min(u.stop, site.stop), u.A.shape[0]
        b[lo - site.start:hi - site.start, col:col + rank] = u.B.detach().float()[lo - u.start:hi - u.start] * (
            u.scaling / scaling)
        col += rank
    return a, b, scaling


def _short(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj → self_attn.q_proj (the name without its layer)."""
    return re.sub(r"^.*?\.\d+\.", "", hf_name)


def _target_modules(chosen: list[str], n_layers: int) -> list[str]:
    """Short names where every layer has the module, else the full names (so peft adds no others)."""
    counts = Counter(_short(n) for n in chosen)
    return sorted({_short(n) if counts[_short(n)] == n_layers else n for n in chosen})


def _updates_by_path(model: nn.Module) -> dict[str, list[LoraUpdate]]:
    found = {}
    for path, linear in lora_layers(model):
        if linear.lora.merged:
            raise UserError("the LoRA updates are merged into the weights; unmerge_lora(model) before saving the "
                            "adapter, so that adapter and base stay apart")
        found[path] = list(linear.lora.values())
    return found


def save_peft_adapter(folder: str | Path, model: nn.Module, base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRA updates as a peft adapter folder that `peft.PeftModel.from_pretrained` loads
    onto the transformers model of the same base (see `lmforge.interop.save_hf`)."""
    modules, sites, updates = hf_lora_modules(model), lora_sites(model), _updates_by_path(model)
    tensors, shapes = {}, {}
    for hf_name, key in modules.items():
        site = sites[key]
        parts = [u for u in updates.get(site.path, []) if u.start < site.stop and site.start < u.stop]
        if parts:
            a, b, scaling = _combine(parts, site)
            tensors[f"{KEY_PREFIX}{hf_name}.lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{KEY_PREFIX}{hf_name}.lora_B.weight"] = b.cpu().contiguous()
            shapes[hf_name] = (a.shape[0], scaling * a.shape[0])
    if not tensors:
        raise UserError("the model has no LoRA updates to save; apply method 'lora' or 'qlora' first")
    drops = [u.drop.p for us in updates.values() for u in us if isinstance(u.drop, nn.Dropout)]
    dropout = drops[0] if drops else 0.0
    config = _peft_config(model, shapes, dropout, base_model_name_or_path)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    write_atomically(Path(folder), write)


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """peft rank/alpha patterns for the modules whose value is not the default: one per module kind
    (e.g. `mlp\\.down_proj`) when all its layers agree, else one per module."""
    kinds: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        kinds.setdefault(_short(name), {})[name] = value
    out = {}
    for kind, group in kinds.items():
        if len(set(group.values())) == 1:
            out.update({re.escape(kind): v for v in set(group.values()) if v != default})
        else:
            out.update({re.escape(n): v for n, v in group.items() if v != default})
    return out


def _peft_config(model: nn.Module, shapes: dict[str, tuple[int, float]], dropout: float,
                 base: str | None) -> dict[str, Any]:
    (r, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _target_modules(list(shapes), model.cfg.n_layers),
        "rank_pattern": _patterns({n: rank for n, (rank, _) in shapes.items()}, r),
        "alpha_pattern": _patterns({n: a for n, (_, a) in shapes.items()}, alpha),
        "bias": "none", "fan_in_fan_out": architecture_of(model.cfg) == "gpt2", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


# -- peft → lmforge ------------------------------------------------------------------------------


def _peft_pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rule: a pattern key matches a module whose name ends with it (as a regex)."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _check_config(config: dict[str, Any], folder: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(f"'{folder}' holds a {config.get('peft_type')} adapter; lmforge reads peft LORA adapters")
    refused = {"use_dora": bool(config.get("use_dora")), "lora_bias": bool(config.get("lora_bias")),
               "bias": config.get("bias", "none") != "none", "modules_to_save": bool(config.get("modules_to_save")),
               "trainable_token_indices": bool(config.get("trainable_token_indices"))}
    for option, bad in refused.items():
        if bad:
            raise UserError(f"the adapter in '{folder}' sets {option}={config[option]!r}, which lmforge does not "
                            "implement; save it with plain LoRA (bias='none', no DoRA, no modules_to_save)")


def _read_pairs(tensors: dict[str, torch.Tensor], modules: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key.removeprefix(KEY_PREFIX))
        if not found:
            raise UserError(f"adapter tensor '{key}' is not a LoRA A/B weight; lmforge loads plain LoRA adapters")
        module, which = found.groups()
        if module not in modules:
            raise UserError(f"the adapter adapts '{module}', which this model does not have (or lmforge cannot "
                            "adapt); load it onto the base model it was trained on")
        pairs.setdefault(module, {})[which] = tensor
    return pairs


def _compress(keys: list[str], n_blocks: int) -> list[str]:
    """Site keys → short targets where every block has the target, else the keys themselves."""
    counts = Counter(k.rsplit(".", 1)[1] for k in keys)
    return sorted({k.rsplit(".", 1)[1] if counts[k.rsplit(".", 1)[1]] == n_blocks else k for k in keys})


def load_peft_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put a LoRA adapter saved by peft (`save_pretrained`) onto an lmforge model loaded from the same
    base: the result computes what peft's PeftModel computes. Freezes the base, like apply_lora."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a peft adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_json_object(folder / ADAPTER_CONFIG, "peft adapter config", "save the adapter again")
    _check_config(config, folder)
    modules = hf_lora_modules(model)
    pairs = _read_pairs(read_safetensors(folder / ADAPTER_WEIGHTS), modules)
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'{folder / ADAPTER_CONFIG}' needs a whole number r and a number lora_alpha; got "
                        f"r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}") from None
    ranks, alphas = {}, {}
    for module, pair in pairs.items():
        rank = int(pair["A"].shape[0])
        if rank != _peft_pattern(config.get("rank_pattern") or {}, module, r):
            raise UserError(f"adapter weight {module}.lora_A has rank {rank} but adapter_config.json says "
                            f"{_peft_pattern(config.get('rank_pattern') or {}, module, r)}")
        ranks[modules[module]] = rank
        alphas[modules[module]] = float(_peft_pattern(config.get("alpha_pattern") or {}, module, alpha))
    n_blocks = sum(1 for m in model.modules() if isinstance(m, Block))
    cfg = LoraConfig(targets=_compress(list(ranks), n_blocks), r=r, alpha=alpha,
                     dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")),
                     rank_pattern={k: v for k, v in ranks.items() if v != r},
                     alpha_pattern={k: v for k, v in alphas.items() if v != alpha})
    apply_lora(model, cfg)
    _copy_pairs(model, pairs, modules)
    return model


@torch.no_grad()
def _copy_pairs(model: nn.Module, pairs: dict[str, dict[str, torch.Tensor]], modules: dict[str, str]) -> None:
    sites = lora_sites(model)
    for module, pair in pairs.items():
        site = sites[modules[module]]
        update = model.get_submodule(site.path).lora[site.target]
        for which, param in (("A", update.A), ("B", update.B)):
            if which not in pair or pair[which].shape != param.shape:
                got = tuple(pair[which].shape) if which in pair else "nothing"
                raise UserError(f"adapter weight {module}.lora_{which} has shape {got}, the model needs "
                                f"{tuple(param.shape)}; load it onto the base model it was trained on")
            param.copy_(pair[which])


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load either adapter format onto a base model: lmforge's method state or a peft LoRA adapter."""
    folder = Path(folder)
    if (folder / STATE_CONFIG).is_file():
        return load_method_state(model, folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return load_peft_adapter(model, folder)
    raise UserError(f"'{folder}' holds no adapter ({STATE_CONFIG} from lmforge or {ADAPTER_CONFIG} from peft)")
