"""Every script in benchmarks/ runs end to end with --quick (tiny shapes, both contenders, the equivalence
checks, the table and the ratio line), so a rename inside lmforge cannot break a benchmark unnoticed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py") if not path.name.startswith("_"))
DATA_ABSENT = 77  # benchmarks/_common.py: the script's input data (shared/data) is not on this machine
TABLE_RULE = re.compile(r"^-+(  -+)+ *$", re.M)  # the dashes under a format_table header
# Lines that carry a script's comparison, beyond its table; a script not named here needs only the table.
COMPARISON = {
    "decode.py": [r"first \d+ greedy tokens identical: True \(\d+ distinct\)", r"ratio lmforge/hf \(tokens/s\): \d"],
    "train_throughput.py": [r"same weights, max \|logit difference\|", r"ratio lmforge/reference .*: \d",
                            r"ratio lmforge/hf .*: \d"],
    "time_to_loss.py": [r"ratio nanogpt_time / best_time: \d"],
    "sst2_pretraining.py": [r"pre-training changed dev accuracy by [-+]\d"],
    "dialogsum_peft.py": [r"^full ", r"^lora "],
    "finetune_step.py": [r"same weights, \|loss difference\| .*: lora \d", r"ratio lmforge/peer lora .*: \d",
                         r"ratio lmforge/peer qlora .*: \d", r"ratio lmforge/peer full .*: \d"],
    "compress.py": [r"^GPTQ-4 \(g\d+\) ", r"^wanda 50% ", r"^distilled student", r"^same student from scratch",
                    r"^lmforge int8-dynamic +\d"],
    "align_hacking.py": [r"beta=0\.00: reward", r"beta=0\.05: reward", r"beta=0\.20: reward", r"^results:"],
    "align_reward.py": [r"best lmforge reward model .+: \d+\.\d% vs longer answer wins \d+\.\d% and bag of words "
                        r"\d+\.\d%"],
    "align_code.py": [r"base: compile rate", r"ppo: compile rate", r"grpo: compile rate", r"dpo: compile rate"],
    "scale.py": [r"none×1: measured", r"ddp×2: measured", r"\| run \| activation checkpointing \|"],
    "fim.py": [r"FIM cost in left-to-right val loss: [-+]\d", r"^FIM model, prefix \+ suffix \(PSM infill\) "],
    "word2vec.py": [r"^corpus: [\d,]+ words", r"^skipgram: lmforge - gensim accuracy",
                    r"^cbow: lmforge - gensim accuracy", r"^skipgram\s+gensim\s+3CosAdd"],
    "recurrent.py": [r"^transformer \(1x32", r"^lstm \(2x\d+", r"^gru - transformer loss by position:",
                     r"^--- sample rnn ---"],
    "serve_load.py": [r"ratio batched/sequential \(tokens/s\) server, \d+ clients: \d", r"exit status after SIGTERM 0"],
}


def run_quick(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_QUICK_RESULTS": str(tmp_path / "results"),
           "OMP_NUM_THREADS": "1"}  # tiny shapes: a second thread only waits on the other tests' processes
    return subprocess.run([sys.executable, script, "--quick", *extra], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=900)


def recorded_results() -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in (BENCH / "results").glob("*")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_quick(script: str, tmp_path: Path) -> None:
    before = recorded_results()
    done = run_quick(script, tmp_path)
    if done.returncode == DATA_ABSENT:
        pytest.skip(f"shared/data absent: {done.stderr.strip()}")
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert TABLE_RULE.search(done.stdout), f"{script} printed no table:\n{done.stdout[-3000:]}"
    for pattern in COMPARISON.get(script, []):
        assert re.search(pattern, done.stdout, re.M), f"{script}: no line matching {pattern!r}:\n{done.stdout[-3000:]}"
    assert recorded_results() == before, "a --quick run changed benchmarks/results"
    if "write_results(" in (BENCH / script).read_text():
        assert list((tmp_path / "results").glob("*.json")), f"{script} --quick wrote no results JSON"


def test_decode_refuses_a_degenerate_identity_check(tmp_path: Path) -> None:
    """At GPT-2's own init a random model repeats one token; matching HF on that proves nothing."""
    done = run_quick("decode.py", tmp_path, "--weight-scale", "1")
    assert done.returncode != 0
    assert "distinct tokens (< --min-distinct 5)" in done.stderr, done.stderr[-3000:]
    assert "ratio" not in done.stdout
