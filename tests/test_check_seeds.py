"""`lmforge estimate --check-seeds`: every numeric claim of the study notes, quoted verbatim, computed, judged."""

import shutil
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.recipes.estimate import EstimateConfig, run_estimate
from lmforge.recipes.estimate_seeds import check_seeds, render_claims, seed_claims

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

# The start of each quote → the start of its verdict. A new claim or a changed verdict must be pinned here.
VERDICTS = {
    "1 parameter (weight) = 4 bytes": "holds",
    "1 billion parameters need 4*10^9 bytes": "holds",
    "1B parameters = 4 x 10^9 bytes": "holds",
    "2 Adam optimizer states = 8 bytes": "holds",
    "Gradients = 4 bytes per weight.": "holds only if training in fp32",
    "Activations and temp memory = 8 bytes": "holds only if a micro-batch is ~1,248 tokens",
    "Total: Approx. 24 bytes per weight.": "holds",
    "So approx. 80GB RAM for 1 billion weights.": "does not hold",
    "At 8 bit, a 1 billion weight model would need 20GB": "does not hold",
    "One petaflop per second-day": "holds",
    "It will take 8 NVIDIA V100": "holds only if the V100s run at their full fp16 tensor-core peak",
    "It will take 2 NVIDIA A100": "holds only if the A100's 2:4 structured-sparsity peak counts",
    "Optimal data size is 20 times": "holds",
    "All scores are divided by $8\\sqrt{d_k}$": "does not hold",
    "diving by the square root": "holds",
    "So the overall time complexity": "holds",
    "Z = W[Z_0, Z_1, ..., Z_k]": "does not hold",
    "in the original transformer model, d = 512": "holds",
    "the paper stacks six": "holds",
    "Embedding matrix E has shape": "holds",
    "learn a position embedding matrix Epos of shape [1 × N ]": "does not hold",
    "numbers in the range of 12-100": "holds",
    "then the number of trainable parameters would be 32678": "does not hold",
    "$A$ has dimensions": "holds",
    "B has dimension": "holds",
    "so that would reduce 86%": "holds",
    "including somewhere between 20 and 100 virtual tokens": "holds only if the embedding width is about 512-1024",
    "Today's models are at 175 to 500 billion": "holds",
}


def test_every_claim_has_its_pinned_verdict():
    claims = seed_claims()
    assert len(claims) == len(VERDICTS)
    for claim in claims:
        (start,) = [s for s in VERDICTS if claim.quote.startswith(s)]
        assert claim.verdict == VERDICTS[start] or claim.verdict.startswith(VERDICTS[start] + " "), claim
        assert claim.verdict.split(" only if")[0] in ("holds", "does not hold") and claim.why and claim.computation


def claim_starting(start: str):
    (claim,) = [c for c in seed_claims() if c.quote.startswith(start)]
    return claim


def test_the_numbers_behind_the_headline_verdicts():
    assert "24 GB, not 80" in claim_starting("So approx. 80GB").computation
    assert "= 32,768" in claim_starting("then the number of trainable").computation
    assert "√d_k = 8, 8√d_k = 64" in claim_starting("All scores are divided").computation
    assert "= 3.2 GPUs" in claim_starting("It will take 2 NVIDIA A100").computation
    assert "= 8 GPUs" in claim_starting("It will take 8 NVIDIA V100").computation
    assert "85.9%" in claim_starting("so that would reduce 86%").computation


@pytest.mark.skipif(not SEEDS.is_dir(), reason="../shared/seeds is absent")
def test_every_quote_occurs_verbatim_in_its_seed():
    assert check_seeds(SEEDS) == str(SEEDS)
    for claim in seed_claims():
        text = (SEEDS / claim.seed).read_text(encoding="utf-8")
        assert all(quote in text for quote in claim.quotes), claim.quote


def test_an_edited_seed_is_named_and_a_missing_folder_still_prints(tmp_path, capsys):
    claim = seed_claims()[0]
    for name in {c.seed for c in seed_claims()}:
        (tmp_path / name).write_text("".join(c.quote.replace(" … ", " ") + " " + " ".join(c.quotes)
                                             for c in seed_claims() if c.seed == name))
    assert check_seeds(tmp_path) == str(tmp_path)
    (tmp_path / claim.seed).write_text("nothing left")
    with pytest.raises(UserError, match="no longer occurs in"):
        check_seeds(tmp_path)
    shutil.rmtree(tmp_path)
    run_estimate(EstimateConfig(check_seeds=True, seeds_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert "seeds folder absent" in out and "32,768" in out


def test_markdown_table_has_one_row_per_claim():
    table = render_claims(seed_claims(), "markdown")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(seed_claims())
    assert "| seed | claim (verbatim) | computation | verdict |" in table
    assert all(row.count(" | ") == 3 for row in rows)  # quotes' own pipes are escaped
    assert "\\|V \\|" in table
