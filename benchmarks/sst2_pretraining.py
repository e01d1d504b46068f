"""Does masked-LM pre-training help? SST-2 sentiment with a small encoder, on this CPU.

  (a) pretrained  `lmforge pretrain --family masked` on the SST-2 *training sentences* (labels
                  stripped), then `lmforge finetune --task classify` on the labelled training set;
  (b) scratch     the same architecture and tokenizer, fine-tuned from random weights with the
                  same steps, batch, learning rate and schedule (`finetune --from_scratch`).

Both report dev accuracy (872 sentences) and wall time. The encoder is the `small-bert` preset
(BERT block: post-norm, GELU, learned positions, segment embeddings; d=128, 4 layers, 4 heads)
with a WordPiece vocabulary trained on the same sentences. Everything goes through the same
Python API the CLI uses (`pretrain`, `finetune`).

    python benchmarks/sst2_pretraining.py                 # the recorded run (~10 min on 2 cores)
    python benchmarks/sst2_pretraining.py --quick         # smoke run: 400 sentences, a few steps, results to /tmp
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, format_table, require_data, settle, write_results

from lmforge.recipes.finetune import FinetuneConfig, finetune
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.train import TrainConfig

SST2 = SHARED_DATA / "sentiment"


def sentences_only(labelled: Path, out: Path) -> Path:
    """The text of '<label> <text>' lines: pre-training must not see the labels."""
    out.write_text("".join(line.partition(" ")[2] + "\n" for line in labelled.read_text().splitlines()))
    return out


def excerpt(source: Path, out: Path, lines: int) -> Path:
    """The first `lines` lines of `source` (--quick: a handful of examples)."""
    out.write_text("".join(line + "\n" for line in source.read_text().splitlines()[:lines]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2, help="folder with sst2.train.txt and sst2.dev.txt")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    parser.add_argument("--no-settle", action="store_true", help="do not wait for an idle CPU before timing")
    args = parser.parse_args()
    vocab, batch_size, eval_batches = 4000, 32, 20
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.no_settle = 4, 4, True
        vocab, batch_size, eval_batches = 500, 8, 2
    hint = "pass --data to the folder holding SST-2"
    train_file = require_data(args.data / "sst2.train.txt", hint)
    dev_file = require_data(args.data / "sst2.dev.txt", hint)

    work = Path(tempfile.mkdtemp(prefix="sst2-bench-"))
    if args.quick:
        train_file, dev_file = excerpt(train_file, work / "train.txt", 400), excerpt(dev_file, work / "dev.txt", 64)
    corpus = sentences_only(train_file, work / "sentences.txt")
    settle(not args.no_settle)
    start = time.perf_counter()
    run = pretrain(PretrainConfig(
        out_dir=str(work / "mlm"), family="masked", overwrite=True,
        data=DataConfig(sources=[str(corpus)], val_fraction=0.05),
        tokenizer=TokenizerConfig(vocab_size=vocab),
        model={"preset": "small-bert", "context_length": 64},
        train=TrainConfig(steps=args.pretrain_steps, batch_size=batch_size, lr=1e-3,
                          warmup_steps=min(100, args.pretrain_steps), eval_every=max(args.pretrain_steps // 4, 1),
                          eval_batches=eval_batches, log_every=50, progress=False),
    ))
    pretrain_s = time.perf_counter() - start
    mlm_val = run.result.val_losses[-1][1] if run.result.val_losses else float("nan")

    results = {}
    for name, scratch in (("pretrained", False), ("scratch", True)):
        settle(not args.no_settle)
        outcome = finetune(FinetuneConfig(
            model=str(run.out_dir / "checkpoint"), data=[str(train_file)], eval_file=str(dev_file),
            out_dir=str(work / name), overwrite=True, from_scratch=scratch, max_length=64,
            train=TrainConfig(steps=args.finetune_steps, batch_size=batch_size, lr=args.finetune_lr,
                              warmup_steps=min(50, args.finetune_steps),
                              weight_decay=0.01, eval_every=max(args.finetune_steps // 3, 1),
                              eval_batches=eval_batches, progress=False),
        ))
        results[name] = {"dev_accuracy": outcome.accuracy, "finetune_s": outcome.seconds}

    rows = [("pretrained (MLM, then fine-tune)", results["pretrained"]["dev_accuracy"], pretrain_s,
             results["pretrained"]["finetune_s"]),
            ("scratch (fine-tune only)", results["scratch"]["dev_accuracy"], 0.0, results["scratch"]["finetune_s"])]
    print("\n" + format_table(["encoder", "dev accuracy", "pre-train s", "fine-tune s"], rows))
    gain = results["pretrained"]["dev_accuracy"] - results["scratch"]["dev_accuracy"]
    print(f"\npre-training changed dev accuracy by {gain:+.1f} points (MLM val loss {mlm_val:.3f}, "
          f"{run.model.num_parameters() / 1e6:.2f}M parameters)")
    path = write_results("sst2_pretraining", {
        "settings": vars(args) | {"data": str(args.data)},
        "mlm_val_loss": mlm_val, "pretrain_s": pretrain_s, **results, "accuracy_gain": gain,
    }, quick=args.quick)
    print(f"wrote {path}")
    if args.quick:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
