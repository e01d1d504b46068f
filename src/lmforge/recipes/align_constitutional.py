"""`lmforge align constitutional`: Constitutional AI data from any causal model lmforge loads.

model (lmforge checkpoint or HF folder, with its tokenizer) + red-team prompts (hh-rlhf transcripts' first
human turns, JSONL or text) + a constitution (YAML; the default ships with lmforge) → out_dir/
  sft.jsonl          prompt/completion records of the final revisions: `lmforge finetune --data sft.jsonl`
                     (add `--template chat` when the model has a chat template);
  preferences.jsonl  prompt/chosen/rejected pairs judged by the model (RLAIF): `lmforge align dpo` / `reward`;
  summary.json       counts, the principle behind every record, the judge's probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.align.constitutional import (
    CaiData,
    CaiOptions,
    constitutional_data,
    load_constitution,
    read_red_team_prompts,
)
from lmforge.data.preferences import write_pairs
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.recipes.align_common import load_causal

SFT_FILE, PREFERENCES_FILE, SUMMARY_FILE = "sft.jsonl", "preferences.jsonl", "summary.json"


@dataclass
class ConstitutionalConfig:
    model: str = field(default="", metadata={"help": "causal lmforge checkpoint or Hugging Face folder with its "
                                                     "tokenizer (required)"})
    prompts: str = field(default="", metadata={
        "help": "red-team prompts: hh-rlhf transcripts (.jsonl.gz: their first human turns, e.g. "
                "../shared/data/preference/hh-rlhf-harmless-base-test.jsonl.gz), JSONL (--prompt_field) or text, "
                "one prompt a line (required)"})
    prompt_field: str = field(default="prompt", metadata={"help": "JSONL prompts: the field holding the prompt"})
    limit: int | None = field(default=64, metadata={"help": "use the first N distinct prompts; none = all"})
    constitution: str | None = field(default=None, metadata={
        "help": "constitution YAML (principles with critique/revision/choice prompts, optional examples); "
                "default: the one shipped with lmforge"})
    out_dir: str = field(default="runs/constitutional", metadata={"help": "where sft.jsonl, preferences.jsonl and "
                                                                          "summary.json go"})
    rounds: int = field(default=1, metadata={"help": "critique-revision rounds, a new principle each round"})
    few_shot: bool = field(default=True, metadata={"help": "show the constitution's examples before each talk"})
    preferences: bool = field(default=True, metadata={"help": "also sample two answers per prompt and judge them"})
    both_orders: bool = field(default=True, metadata={
        "help": "judge each pair as (A,B) and (B,A) and average, so a liking for one letter cancels"})
    max_new_tokens: int = field(default=96, metadata={"help": "tokens per answer, critique and revision"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass; 1 = off"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated (and judged) together"})
    seed: int = field(default=0, metadata={"help": "seeds the principle draws and all sampling"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs already in out_dir"})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit} must be >= 1 (or none for every prompt)")

    def options(self) -> CaiOptions:
        return CaiOptions(rounds=self.rounds, batch_size=self.batch_size, few_shot=self.few_shot,
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p, seed=self.seed, preferences=self.preferences,
                          both_orders=self.both_orders)


def run_constitutional(cfg: ConstitutionalConfig) -> CaiData:
    """Write the SFT records, the RLAIF pairs and the summary into cfg.out_dir; return them."""
    if not cfg.model or not cfg.prompts:
        raise UserError("align constitutional needs --model (a causal checkpoint or HF folder) and --prompts FILE")
    options = cfg.options()  # option errors before any loading
    constitution = load_constitution(cfg.constitution)
    prompts = read_red_team_prompts(cfg.prompts, cfg.limit, cfg.prompt_field)
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    if (out / SUMMARY_FILE).exists() and not cfg.overwrite:
        raise UserError(f"'{out}' already holds constitutional data; pass --overwrite true or another --out_dir")
    model, tokenizer = load_causal(cfg.model, "--model", "constitutional AI", pick_device(cfg.device))
    data = constitutional_data(model, tokenizer, prompts, constitution, options)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SFT_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in data.sft)
    write_pairs(out / PREFERENCES_FILE, data.pairs)
    summary = {**data.summary, "model": cfg.model, "prompt_file": cfg.prompts,
               "finetune_template": "chat" if data.summary["chat_template"] else "instruction"}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(prompts)} prompts -> {len(data.sft)} SFT records ({out / SFT_FILE}), {len(data.pairs)} preference "
          f"pairs ({out / PREFERENCES_FILE}); summary in {out / SUMMARY_FILE}")
    return data
