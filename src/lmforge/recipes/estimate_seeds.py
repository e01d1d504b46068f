"""The seeds' numbers, checked: every numeric claim in the study notes (../shared/seeds), quoted verbatim with
its file, the arithmetic that tests it (done by `lmforge.estimate` where a model is involved) and a verdict:
"holds", "does not hold" or "holds only if …", with a one-line why.

The claims are embedded here, so the table prints without the seeds; where the folder exists `check_seeds`
verifies that every quote still occurs in its file, character for character.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge import estimate as est
from lmforge.config import ModelConfig
from lmforge.errors import UserError

# The repository's sibling folder ../shared/seeds (the working directory is the repository root).
SEEDS_DIR = Path("..") / "shared" / "seeds"
S0, S1, S2, S3, S4 = ("000_073914d57cfd6518.txt", "001_2f0ad6bcaa5c0635.txt", "002_af924728e84628bc.txt",
                      "003_305fa8daefe3f679.txt", "004_eb4863e6d2d138da.txt")
BILLION = 1_000_000_000


@dataclass(frozen=True)
class Claim:
    seed: str  # the file it is quoted from
    quotes: tuple[str, ...]  # verbatim fragments of that file (one claim may need two)
    computation: str
    verdict: str  # "holds", "does not hold" or "holds only if ..."
    why: str

    @property
    def quote(self) -> str:
        return " … ".join(self.quotes)

    def as_dict(self) -> dict[str, str]:
        return {**asdict(self), "quotes": list(self.quotes), "quote": self.quote}


def holds(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def memory_claims() -> list[Claim]:
    """The course notes' memory arithmetic (seed 002, and seed 004's 4 GB)."""
    fp32, adam, n = est.PRECISIONS["fp32"], est.ADAM_BYTES, BILLION
    rule = fp32 + adam + fp32 + 8  # weights + Adam + gradients + "activations and temp memory"
    gpt2, llama = ModelConfig.from_preset("gpt2"), ModelConfig.from_preset("llama2-7b")
    per_token = {name: est.activation_bytes(c, 1, c.context_length, p)["total"] / c.context_length
                 for name, c, p in (("gpt2", gpt2, "fp32"), ("llama", llama, "bf16"))}
    at_8 = {name: 8 * est.count_parameters(c) / per_token[name] for name, c in (("gpt2", gpt2), ("llama", llama))}
    return [
        Claim(S2, ("1 parameter (weight) = 4 bytes (32 bit float)",), "32 bits / 8 = 4 bytes",
              holds(fp32 == 4), "an IEEE-754 single is 32 bits"),
        Claim(S2, ("1 billion parameters need 4*10^9 bytes = 4GB of GPU RAM needed at 32 bit full precision, just "
                   "for the weights.",), f"1e9 × 4 B = {n * fp32:.0e} B = 4 GB (= {n * fp32 / 2**30:.2f} GiB)",
              holds(n * fp32 == 4e9), "decimal gigabytes; the GPU's GiB make it 3.73"),
        Claim(S4, ("1B parameters = 4 x 10^9 bytes = 4GB",), "1e9 × 4 B = 4e9 B", holds(n * fp32 == 4e9),
              "the same fp32 arithmetic"),
        Claim(S2, ("2 Adam optimizer states = 8 bytes per weight.",), "2 moments × 4 B (fp32) = 8 B",
              holds(adam == 8), "AdamW keeps m and v in fp32; mixed precision adds a 4-byte fp32 master copy"),
        Claim(S2, ("Gradients = 4 bytes per weight.",), "one fp32 value per weight", "holds only if training in fp32",
              "bf16/fp16 mixed precision keeps 2-byte gradients (and the 4-byte master copy)"),
        Claim(S2, ("Activations and temp memory = 8 bytes per weight (worst case).",),
              f"activations are per token, not per weight: GPT-2 124M (fp32) saves {per_token['gpt2'] / 1e6:.2f} MB "
              f"per token, Llama-2-7B (bf16) {per_token['llama'] / 1e6:.2f} MB",
              f"holds only if a micro-batch is ~{at_8['gpt2']:,.0f} tokens (GPT-2 124M) or ~{at_8['llama']:,.0f} "
              "(Llama-2-7B)", "activation memory grows with batch × sequence length, not with the parameter count"),
        Claim(S2, ("Total: Approx. 24 bytes per weight.",), f"4 (weights) + 8 (Adam) + 4 (grads) + 8 = {rule:.0f} B",
              holds(rule == 24), "the sum is right; the states alone are 16 B (`lmforge estimate`)"),
        Claim(S2, ("So approx. 80GB RAM for 1 billion weights.",), f"24 B × 1e9 = {rule * n / 1e9:.0f} GB, not 80",
              holds(abs(rule * n / 1e9 - 80) < 8), "80 GB is an A100/H100's memory, not 24 B × 1e9 (3.3× too high)"),
        Claim(S2, ("At 8 bit, a 1 billion weight model would need 20GB GPU RAM.",),
              f"1e9 × 1 B = {n / 1e9:.0f} GB of int8 weights; all 24 B/param at 8 bit: {rule / 4:.0f} GB; "
              "20 GB is the wrong 80 GB ÷ 4", holds(False),
              "8-bit weights take 1 GB; the 20 GB scales the 3.3×-too-high 80 GB"),
    ]


def compute_claims() -> list[Claim]:
    """Petaflop/s-days, GPUs per petaflop/s, the 20-tokens rule (seed 002)."""
    v100, a100 = 1e15 / est.GPUS["v100"], 1e15 / est.GPUS["a100"]
    chinchilla = est.training_flops(70 * BILLION, 1_400 * BILLION)
    law_n, law_d = est.chinchilla_optimum(chinchilla)
    gap = est.chinchilla_loss(70e9, 1.4e12) / est.chinchilla_loss(law_n, law_d) - 1
    return [
        Claim(S2, ("One petaflop per second-day: Is 1,000,000,000,000,000 (one quadrillion) floating point "
                   "operations per second for one day.",),
              f"1e15 FLOP/s × 86,400 s = {est.PETAFLOP_S_DAY:.3g} FLOPs", holds(est.PETAFLOP_S_DAY == 8.64e19),
              "a rate held for a day"),
        Claim(S2, ("It will take 8 NVIDIA V100 GPU's to run 1 petaflop/s-day.",),
              f"1 PFLOP/s ÷ 125 TFLOP/s (V100 fp16 tensor peak) = {v100:.0f} GPUs; at 40% MFU "
              f"{v100 / 0.4:.0f}", "holds only if the V100s run at their full fp16 tensor-core peak",
              "real training reaches 30-50% of peak"),
        Claim(S2, ("It will take 2 NVIDIA A100 GPU's to run 1 petaflop/s-day.",),
              f"1 PFLOP/s ÷ 312 TFLOP/s (A100 dense bf16 peak) = {a100:.1f} GPUs; ÷ 624 TFLOP/s (2:4 sparse) = "
              f"{1e15 / est.A100_SPARSE_PEAK:.1f}",
              "holds only if the A100's 2:4 structured-sparsity peak counts",
              f"at its dense peak it takes {math.ceil(a100)}; at 40% MFU {a100 / 0.4:.0f}"),
        Claim(S2, ("Optimal data size is 20 times the number of weights",),
              f"Chinchilla: 70B × 20 = 1.4T tokens, C = 6ND = {chinchilla:.3g}; the fitted law with the published "
              f"constants puts that C's optimum at {law_n / 1e9:.0f}B params × {law_d / 1e12:.1f}T tokens "
              f"({law_d / law_n:.0f}/param), only {gap:.2%} lower loss than 70B × 1.4T", "holds",
              "Hoffmann et al.'s approaches 1-2 (and Besiroglu et al.'s 2024 refit of approach 3) give ~20; the "
              "paper's rounded approach-3 constants drift, on a nearly flat loss"),
    ]


def attention_claims() -> list[Claim]:
    """Scaling, heads and shapes in the attention notes (seeds 000, 003)."""
    d_k = 64
    base, gpt2 = ModelConfig.from_preset("transformer-base"), ModelConfig.from_preset("gpt2")
    return [
        Claim(S0, ("All scores are divided by $8\\sqrt{d_k}$, where $d_k$ is the dimension of the key vectors.",),
              f"with d_k = {d_k}: √d_k = {math.sqrt(d_k):.0f}, 8√d_k = {8 * math.sqrt(d_k):.0f}", holds(False),
              "the paper divides by √d_k, which is 8 for d_k = 64; 8√d_k shrinks the scores 8× too much"),
        Claim(S3, ("diving by the square root of the dimensionality of the query and key vectors (dk)",),
              "softmax(QKᵀ/√d_k)V, as lmforge's attention computes it", "holds",
              "Vaswani et al. 2017, eq. 1"),
        Claim(S0, ("So the overall time complexity will be $O(kdn^2)$",),
              "per head QKᵀ and AV are 2·n²·d multiply-adds; k heads: 2·k·d·n²", "holds",
              "quadratic in the sequence length n"),
        Claim(S0, ("Z = W[Z_0, Z_1, ..., Z_k]", "i=1,...,k"), "Z_0 … Z_k are k + 1 outputs; the heads are Z_1 … Z_k",
              holds(False), "off by one: concatenate [Z_1, ..., Z_k]"),
        Claim(S3, ("in the original transformer model, d = 512 and dff = 2048 (512 → 2048 → 512)",),
              f"transformer-base preset: d_model = {base.d_model}, d_ff = {base.hidden_size} = 4·d",
              holds(base.d_model == 512 and base.hidden_size == 2048), "Vaswani et al. 2017, table 3 (base)"),
        Claim(S1, ("the paper stacks six of them on top of each other",), f"transformer-base: {base.n_layers} layers",
              holds(base.n_layers == 6), "N = 6 encoder and 6 decoder layers"),
        Claim(S3, ("Embedding matrix E has shape [|V | × d ]",),
              f"GPT-2: {gpt2.vocab_size} × {gpt2.d_model} = {gpt2.vocab_size * gpt2.d_model:,} parameters",
              "holds", "one d-vector per vocabulary entry"),
        Claim(S3, ("learn a position embedding matrix Epos of shape [1 × N ]",),
              f"one d-vector per position: [N × d]; GPT-2: {gpt2.context_length} × {gpt2.d_model} = "
              f"{gpt2.context_length * gpt2.d_model:,}",
              holds(False), "a 1 × N matrix holds one number per position, not a vector to add to each embedding"),
        Claim(S2, ("numbers in the range of 12-100 are common",),
              "heads: GPT-2 124M 12, Llama-2-7B 32, GPT-3 175B 96 (the original transformer 8)", "holds",
              "for today's LLMs; small and older models use fewer"),
    ]


def peft_claims() -> list[Claim]:
    """LoRA and prompt-tuning counts (seed 000)."""
    d, k, r = 512, 64, 8
    full, lora = d * k, r * (d + k)
    widths = {"T5-Small": 512, "T5-Large": 1024, "Llama-2-7B": 4096}
    return [
        Claim(S0, ("then the number of trainable parameters would be 32678",), f"512 × 64 = {full:,}",
              holds(full == 32678), "digits swapped: 32,768"),
        Claim(S0, ("$A$ has dimensions $r\\times k = 8\\times 64 = 512$ parameters",), f"8 × 64 = {r * k}",
              holds(r * k == 512), "r·k"),
        Claim(S0, ("B has dimension $d\\times r = 512\\times 8 = 4096$ trainable parameters",), f"512 × 8 = {d * r}",
              holds(d * r == 4096), "d·r"),
        Claim(S0, ("so that would reduce 86% in parameters to train",),
              f"1 − (512 + 4096) / 32,768 = {1 - lora / full:.1%}", holds(round(100 * (1 - lora / full)) == 86),
              "r·(d + k) = 4,608 of 32,768"),
        Claim(S0, ("including somewhere between 20 and 100 virtual tokens",
                   "only 10k to 100k parameters need to be updated in prompt tuning"),
              "virtual tokens × embedding width: " + ", ".join(
                  f"{name} {20 * w:,}-{100 * w:,}" for name, w in widths.items()),
              "holds only if the embedding width is about 512-1024 (T5-Small to T5-Large)",
              "100 virtual tokens on a 4096-wide model train 409,600"),
        Claim(S2, ("Today's models are at 175 to 500 billion weights in size.",),
              f"GPT-3 175B, PaLM 540B; in bf16 that is {175e9 * 2 / 1e9:.0f}-{540e9 * 2 / 1e9:,.0f} GB of weights",
              "holds", "as of 2023's largest published dense models"),
    ]


def seed_claims() -> list[Claim]:
    """Every numeric claim found in the five seeds, with its computation and verdict."""
    return [*memory_claims(), *compute_claims(), *attention_claims(), *peft_claims()]


def check_seeds(seeds_dir: str | Path = SEEDS_DIR) -> str | None:
    """Verify that every quote occurs verbatim in its seed file; returns the folder checked, or None when it is
    absent (the embedded claims still print). A quote that no longer matches is a UserError naming it."""
    folder = Path(seeds_dir)
    if not folder.is_dir():
        return None
    for claim in seed_claims():
        path = folder / claim.seed
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        for quote in claim.quotes:
            if quote not in text:
                raise UserError(f"seed claim {quote!r} no longer occurs in {path}; update lmforge/recipes/"
                                "estimate_seeds.py or point --seeds_dir at the original seeds")
    return str(folder)


def render_claims(claims: list[Claim], fmt: str = "text", verified_in: str | None = None) -> str:
    """The claims as a Markdown table (`fmt="markdown"`) or as plain numbered paragraphs."""
    source = (f"quotes verified verbatim in {verified_in}" if verified_in
              else "seeds folder absent: embedded quotes, not re-verified")
    if fmt == "markdown":
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")
        # the quote as a code span: verbatim on screen (no *emphasis* or $math$ from its characters)
        rows = [f"| `{c.seed}` | `{cell(c.quote)}` | {cell(c.computation)} | **{cell(c.verdict)}**: {cell(c.why)} |"
                for c in claims]
        return "\n".join([f"The seeds' numbers, checked ({len(claims)} claims; {source}).", "",
                          "| seed | claim (verbatim) | computation | verdict |", "|---|---|---|---|", *rows])
    lines = [f"the seeds' numbers, checked ({len(claims)} claims; {source})"]
    for i, c in enumerate(claims, 1):
        lines += [f"{i:2d}. [{c.seed}] \"{c.quote}\"", f"    computation: {c.computation}",
                  f"    verdict: {c.verdict}: {c.why}"]
    return "\n".join(lines)
