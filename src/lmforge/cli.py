"""`lmforge <stage> ...`: one subcommand per lifecycle stage, each a thin door onto a recipe.

Every subcommand takes `--config FILE.yaml` plus `--key value` overrides of its config
dataclass. Mistakes a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmforge.errors import TrainingInterrupted, UserError
from lmforge.options import OneLineParser, add_options, parse


def _commands() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    from lmforge.recipes.align_constitutional import ConstitutionalConfig, run_constitutional
    from lmforge.recipes.align_dpo import DpoConfig, run_dpo
    from lmforge.recipes.align_reward import RewardConfig, ScoreConfig, run_reward, run_score
    from lmforge.recipes.align_rl import GrpoConfig, PpoConfig, run_grpo, run_ppo
    from lmforge.recipes.convert import ConvertConfig, convert
    from lmforge.recipes.demo import DemoConfig, demo
    from lmforge.recipes.distill import DistillConfig, run_distill
    from lmforge.recipes.embed import EmbedConfig, run_embed
    from lmforge.recipes.estimate import EstimateConfig, run_estimate
    from lmforge.recipes.evaluate import EvaluateConfig, run_evaluate
    from lmforge.recipes.finetune import FinetuneConfig, finetune
    from lmforge.recipes.generate import GenerateConfig, run_generate
    from lmforge.recipes.inspect import InspectConfig, run_inspect
    from lmforge.recipes.merge import MergeConfig, run_merge
    from lmforge.recipes.pretrain import PretrainConfig, TokenizerTrainConfig, pretrain, train_tokenizer
    from lmforge.recipes.prune import PruneConfig, run_prune
    from lmforge.recipes.quantize import QuantizeConfig, run_quantize
    from lmforge.recipes.rag import RagAskConfig, RagIndexConfig, run_rag_ask, run_rag_index
    from lmforge.recipes.report import ReportConfig, run_report
    from lmforge.recipes.serve import ServeConfig, run_serve
    from lmforge.recipes.word2vec import Word2VecConfig, Word2VecQueryConfig, run_word2vec, run_word2vec_query

    def tokenizer_train(cfg: TokenizerTrainConfig) -> None:
        tok = train_tokenizer(cfg)
        print(f"trained a {cfg.tokenizer.kind} tokenizer with {tok.vocab_size} tokens -> {cfg.out}")

    return {
        "tokenizer train": (TokenizerTrainConfig, tokenizer_train, "train a BPE or char-level tokenizer on a corpus"),
        "pretrain": (PretrainConfig, pretrain, "pre-train a causal, masked (BERT) or seq2seq (T5) model from scratch"),
        "finetune": (FinetuneConfig, finetune, "fine-tune (full, lora, qlora, prompt, prefix, adapter, bitfit) on "
                     "instructions or labelled text"),
        "merge": (MergeConfig, run_merge, "fold a LoRA/QLoRA/BitFit fine-tune into its base: plain checkpoint or HF"),
        "generate": (GenerateConfig, run_generate, "continue prompts with greedy / sampling / top-k / top-p decoding"),
        "embed": (EmbedConfig, run_embed, "sentence embeddings (mean-pooled, normalised) from an encoder"),
        "evaluate": (EvaluateConfig, run_evaluate, "perplexity, ROUGE, BLEU, accuracy; zero/one/few-shot task suite"),
        "quantize": (QuantizeConfig, run_quantize, "quantize a checkpoint (fp16, bf16, int8, int8-dynamic, int4, nf4, "
                     "gptq) and report its perplexity, bytes and decode speed against the original"),
        "distill": (DistillConfig, run_distill, "train a smaller student on a teacher's soft targets "
                    "(alpha*T^2*KL + (1-alpha)*CE), causal or seq2seq, optionally from a cached top-k"),
        "prune": (PruneConfig, run_prune, "prune a checkpoint (magnitude, wanda, 2:4, heads, neurons), optionally "
                  "recover with masks held, and report the sparsity, perplexity and speed reached"),
        "serve": (ServeConfig, run_serve, "OpenAI-compatible HTTP server (completions, chat, embeddings; with --index, "
                  "RAG answers) with continuous batching and streaming"),
        "rag index": (RagIndexConfig, run_rag_index, "index documents for retrieval: chunk by tokens, embed (MiniLM by "
                      "default), store in FAISS; re-indexing skips unchanged files"),
        "rag ask": (RagAskConfig, run_rag_ask, "answer a question from an index (dense, BM25 or hybrid retrieval) "
                    "citing its sources as [n], invalid citations removed"),
        "align reward": (RewardConfig, run_reward, "train a reward model on preference pairs (Bradley-Terry), causal "
                         "or encoder backbone; reports held-out pair accuracy and margin"),
        "align score": (ScoreConfig, run_score, "score prompt + completion pairs with a reward-model checkpoint"),
        "align ppo": (PpoConfig, run_ppo, "PPO from a reward model or a Python reward, per-token KL to a frozen "
                      "reference (fixed or adaptive beta), value head + GAE; full or LoRA policy"),
        "align grpo": (GrpoConfig, run_grpo, "GRPO: G samples per prompt, group-relative advantages, no value head, "
                       "the same KL to the reference"),
        "align dpo": (DpoConfig, run_dpo, "DPO on preference pairs against a frozen reference (log-probs computed "
                      "once and cached), beta and label smoothing; full or LoRA policy"),
        "align constitutional": (ConstitutionalConfig, run_constitutional, "Constitutional AI: answer, critique "
                                 "against a principle, revise -> SFT data; AI-judged pairs -> DPO/reward data"),
        "inspect": (InspectConfig, run_inspect, "pictures (PNG): attention maps, sampling rules, position patterns, "
                    "embedding PCA, loss curves"),
        "report": (ReportConfig, run_report, "one self-contained report.html of a run: config, curves, throughput "
                   "and MFU, samples per decoding rule, attention pictures, evaluations, checkpoint size"),
        "estimate": (EstimateConfig, run_estimate, "calculators: parameters, memory (by precision, method, ZeRO "
                     "stage), KV cache, training FLOPs and GPU-days, Chinchilla-optimal size; --check-seeds"),
        "word2vec": (Word2VecConfig, run_word2vec, "word vectors (skip-gram or CBOW, negative sampling) in the "
                     "word2vec text format, scored on analogies"),
        "word2vec-query": (Word2VecQueryConfig, run_word2vec_query, "nearest neighbours and analogies (3CosAdd, "
                           "3CosMul) from saved word vectors"),
        "convert": (ConvertConfig, convert, "convert between lmforge checkpoints and Hugging Face folders"),
        "demo": (DemoConfig, demo, "the main job: tokenizer + pre-training on the stdlib + samples, in minutes"),
    }


def usage(name: str) -> str:
    return f"lmforge {name} [--config FILE.yaml] [--key value ...]"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmforge", description="A language model's whole life: tokenize, build, "
                           "pre-train, generate. Every command takes --config FILE.yaml and --key value overrides.")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (cls, handler, summary) in _commands().items():
        head, _, tail = name.partition(" ")
        if tail:
            if head not in groups:
                group_parser = verbs.add_parser(head, help=f"{head} commands")
                groups[head] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                           parser_class=OneLineParser, required=True)
            sub = groups[head].add_parser(tail, help=summary, description=summary, usage=usage(name))
        else:
            sub = verbs.add_parser(name, help=summary, description=summary, usage=usage(name))
        sub.add_argument("--config", default=None, help="YAML file of options (flags override it)")
        add_options(sub, cls)
        sub.set_defaults(handler=(cls, handler))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    cls, handler = args.handler
    try:
        handler(parse(cls, args))
    except UserError as exc:
        sys.stderr.write(f"lmforge: error: {exc}\n")
        return 2
    except OSError as exc:  # last resort, for what the readers cannot foresee: permissions, a full disk, /proc
        where = f" '{exc.filename}'" if exc.filename else ""
        sys.stderr.write(f"lmforge: error: {exc.strerror or exc}{where}; check the path, its permissions and the "
                         "free disk space\n")
        return 2
    except TrainingInterrupted as stop:  # a checkpoint of the last finished step was written
        sys.stderr.write(f"lmforge: interrupted: {stop}\n")
        return stop.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("lmforge: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
