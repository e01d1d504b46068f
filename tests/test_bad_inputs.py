"""Bad files and bad data, through every subcommand: one line on stderr naming the thing and the fix,
exit status 2, no traceback, and nothing half-written.

Each case runs `lmforge ARGS` against a shared folder of broken inputs built once per module. Most run
in-process through `lmforge.cli.main` (fast: no interpreter start, no torch import per case); the ones
marked SUB run in a real subprocess to prove that no traceback reaches a terminal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import SAMPLE_TEXT, run_cli
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.interop import save_hf
from lmforge.models import build_model
from lmforge.peft import apply_method, save_method_state
from lmforge.tokenizer import train_char, train_wordpiece

SENTENCES = ["a warm and funny film", "a dull and lifeless mess", "smart , sharp and very funny",
             "clumsy writing ruins it"] * 10


class NotATensor:
    """What a hostile pytorch_model.bin may hold: any picklable Python object (torch.load could run its code)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def _cut(path: Path) -> None:
    """Truncate a file to half its size, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _copy(src: Path, dst: Path, edit: Callable[[Path], None]) -> None:
    shutil.copytree(src, dst)
    edit(dst)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every broken input the cases name, built in-process in a few seconds (no training, no download)."""
    w = tmp_path_factory.mktemp("bad")
    (w / "text.txt").write_text(SAMPLE_TEXT)
    (w / "empty.txt").write_text("")
    (w / "short.txt").write_text("x = 1\n")
    (w / "ls").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)  # like /bin/ls: NULs, bad UTF-8
    (w / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    (w / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "cr\xe8me"}\n'.encode("latin-1"))
    (w / "latin1.yaml").write_bytes("train:\n  steps: 1  # caf\xe9\n".encode("latin-1"))
    (w / "blocker").write_text("a regular file where a folder would have to be\n")
    (w / "emptydir").mkdir()
    (w / "binfolder").mkdir()
    (w / "binfolder" / "a.txt").write_bytes(b"\x00\x01\x02\xff\xfe" * 100)
    # configs
    (w / "bad.yaml").write_text("train: [unclosed\n")
    (w / "list.yaml").write_text("- steps\n- lr\n")
    (w / "unknown.yaml").write_text("trian:\n  steps: 1\n")
    # data records
    good = [{"prompt": "def ", "completion": "f(n):", "text": "def f(n):"}] * 4
    (w / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (w / "bad.jsonl").write_text(json.dumps(good[0]) + "\n" + '{"prompt": "x", "completion": \n')
    (w / "missing_field.jsonl").write_text('\n{"prompt": "only a prompt"}\n')
    (w / "alpaca_bad.json").write_text('[{"instruction": "say hi", "output": "hi"},')
    (w / "labels.txt").write_text("1 a warm and funny film\npositive\n")
    (w / "labels_bad.jsonl").write_text('{"text": "fine", "label": "1"}\n{"text": "oops" "label": "0"}\n')
    # tokenizers and models: a causal checkpoint (char tokenizer) and an encoder (WordPiece)
    chars = train_char([SAMPLE_TEXT], {"eos": "<eos>", "pad": "<pad>"})
    torch.manual_seed(0)
    causal = build_model(ModelConfig.from_preset("tiny", vocab_size=chars.vocab_size, context_length=32))
    save(w / "ckpt", causal, chars)
    pieces = train_wordpiece(SENTENCES, vocab_size=120)
    save(w / "enc", build_model(ModelConfig.from_preset("tiny-bert", vocab_size=pieces.vocab_size,
                                                        context_length=32)), pieces)
    # broken checkpoints: one file each
    _copy(w / "ckpt", w / "ckpt_badjson", lambda d: (d / "config.json").write_text('{"d_model": 64,'))
    _copy(w / "ckpt", w / "ckpt_listcfg", lambda d: (d / "config.json").write_text("[1, 2]"))
    _copy(w / "ckpt", w / "ckpt_badfield", lambda d: _edit_json(d / "config.json", n_heads="four"))
    _copy(w / "ckpt", w / "ckpt_misfit", lambda d: _edit_json(d / "config.json", n_layers=3))
    _copy(w / "ckpt", w / "ckpt_truncated", lambda d: _cut(d / "model.safetensors"))
    _copy(w / "ckpt", w / "ckpt_garbage", lambda d: (d / "model.safetensors").write_text("not weights at all\n"))
    _copy(w / "ckpt", w / "ckpt_badtok", lambda d: (d / "tokenizer.json").write_text("hello, I am no tokenizer"))
    _copy(w / "ckpt", w / "ckpt_badtokcfg", lambda d: (d / "tokenizer_config.json").write_text("{eos_token: <"))
    # Hugging Face folders
    save_hf(w / "hf", causal, chars)
    _copy(w / "hf", w / "hf_pickle", lambda d: ((d / "model.safetensors").unlink(),
                                                torch.save({"transformer.wte.weight": NotATensor()},
                                                           d / "pytorch_model.bin")))
    _copy(w / "hf", w / "hf_truncated_bin", lambda d: ((d / "model.safetensors").unlink(),
                                                       torch.save({"w": torch.zeros(64, 64)}, d / "pytorch_model.bin"),
                                                       _cut(d / "pytorch_model.bin")))
    _copy(w / "hf", w / "hf_badindex", lambda d: ((d / "model.safetensors").unlink(),
                                                  (d / "model.safetensors.index.json").write_text('{"weight_map": ')))
    _copy(w / "hf", w / "hf_badfield", lambda d: _edit_json(d / "config.json", n_head="four"))
    # adapters: a LoRA on the causal base, one for another base shape, and broken ones
    apply_method(causal, "lora", r=2)
    save_method_state(w / "ad_lora", causal)
    other = build_model(ModelConfig.from_preset("tiny", vocab_size=chars.vocab_size, d_model=32, context_length=32))
    save_method_state(w / "ad_other", apply_method(other, "lora", r=2))
    _copy(w / "ad_lora", w / "ad_badmethod", lambda d: (d / "method.json").write_text('{"method": "lora"'))
    _copy(w / "ad_lora", w / "ad_truncated", lambda d: _cut(d / "method.safetensors"))
    (w / "ad_badpeft").mkdir()
    (w / "ad_badpeft" / "adapter_config.json").write_text("peft_type: LORA\n")
    save_file({"x": torch.zeros(2)}, str(w / "ad_badpeft" / "adapter_model.safetensors"))
    # evaluation tasks
    task = "kind: generate\ntest:\n  path: {}\nreferences: ['{{completion}}']\nprompt:\n  input: '{{prompt}}'\n"
    (w / "task_badjsonl.yaml").write_text(task.format(w / "bad.jsonl"))
    (w / "task_latin1.yaml").write_text(task.format(w / "latin1.jsonl"))
    (w / "task_unknown.yaml").write_text(task.format(w / "good.jsonl") + "shots: 3\n")
    return w


@dataclass
class Case:
    args: str  # {w}: the world of bad inputs, {t}: this case's empty folder (where outputs would go)
    expect: list[str]  # fragments the one line must hold: the thing's name (file, line, value), the fix
    sub: bool = False  # run in a real subprocess
    before: Callable[[Path, Path], None] | None = field(default=None)


def _resume_run(w: Path, t: Path) -> None:
    shutil.copytree(w / "ckpt_badtok", t / "run" / "checkpoint")


PT = "pretrain --out_dir {t}/run --tokenizer.kind char --model.preset tiny --model.context_length 16 " \
     "--train.steps 1 --train.batch_size 2 --train.progress false"
FT = "finetune --out_dir {t}/ft --train.steps 1 --train.batch_size 2 --train.progress false"
TOK = "tokenizer train --out {t}/tok --tokenizer.kind char"
EV = "evaluate --model {w}/ckpt --out {t}/report.json"
GEN = "generate --max_new_tokens 2"

CASES: dict[str, Case] = {
    # tokenizer train: corpus files and the output folder
    "tok binary source (/bin/ls)": Case(f"{TOK} --data.sources {{w}}/ls", ["{w}/ls", "not UTF-8 text"], sub=True),
    "tok latin-1 source": Case(f"{TOK} --data.sources {{w}}/latin1.txt", ["latin1.txt", "not UTF-8"]),
    "tok folder of binaries": Case(f"{TOK} --data.sources {{w}}/binfolder", ["binfolder", "a.txt", "UTF-8"]),
    "tok empty source": Case(f"{TOK} --data.sources {{w}}/empty.txt", ["empty"]),
    "tok unknown kind": Case("tokenizer train --out {t}/tok --tokenizer.kind sentencepiece",
                             ["tokenizer.kind='sentencepiece'"]),
    "tok negative vocab": Case("tokenizer train --out {t}/tok --data.sources {w}/text.txt --tokenizer.kind bpe "
                               "--tokenizer.vocab_size -5", ["vocab_size=-5"]),
    "tok out under a file": Case("tokenizer train --tokenizer.kind char --data.sources {w}/text.txt "
                                 "--out {w}/blocker/tok", ["{w}/blocker", "not a folder"]),
    # pretrain: corpus, configs, options, checkpoints it starts from
    "pt binary source": Case(f"{PT} --data.sources {{w}}/ls", ["{w}/ls", "not UTF-8 text"]),
    "pt jsonl bad line": Case(f"{PT} --data.sources {{w}}/bad.jsonl", ["bad.jsonl:2", "not valid JSON"]),
    "pt corpus shorter than context": Case(f"{PT} --data.sources {{w}}/short.txt", ["context_length"]),
    "pt folder without text": Case(f"{PT} --data.sources {{w}}/emptydir", ["emptydir", "holds no text files"]),
    "pt invalid yaml": Case("pretrain --out_dir {t}/run --config {w}/bad.yaml", ["bad.yaml", "not valid YAML"]),
    "pt yaml list": Case("pretrain --out_dir {t}/run --config {w}/list.yaml", ["list.yaml", "mapping"]),
    "pt yaml unknown key": Case("pretrain --out_dir {t}/run --config {w}/unknown.yaml", ["trian", "valid:"]),
    "pt yaml not utf-8": Case("pretrain --out_dir {t}/run --config {w}/latin1.yaml", ["latin1.yaml", "UTF-8"]),
    "pt config is a folder": Case("pretrain --out_dir {t}/run --config {w}/emptydir", ["emptydir", "folder"]),
    "pt negative steps": Case(f"{PT} --data.sources {{w}}/text.txt --train.steps -1", ["train.steps=-1"]),
    "pt bad bool": Case(f"{PT} --data.sources {{w}}/text.txt --resume maybe", ["resume='maybe'", "true or false"]),
    "pt bad device": Case(f"{PT} --data.sources {{w}}/text.txt --train.device quantum", ["quantum"]),
    "pt bad dropout": Case(f"{PT} --data.sources {{w}}/text.txt --model.dropout 2", ["model.dropout=2"]),
    "pt out under a file": Case(PT.replace("{t}/run", "{w}/blocker/run") + " --data.sources {w}/text.txt",
                                ["{w}/blocker", "not a folder"], sub=True),
    "pt init_from pickle": Case(f"{PT} --data.sources {{w}}/text.txt --init_from {{w}}/hf_pickle",
                                ["pytorch_model.bin", "unpickle", "safetensors"]),
    "pt tokenizer garbage": Case(f"{PT} --data.sources {{w}}/text.txt --tokenizer.path {{w}}/ckpt_badtok",
                                 ["ckpt_badtok/tokenizer.json", "not a tokenizer"]),
    "pt resume garbage tokenizer": Case("pretrain --out_dir {t}/run --resume --train.steps 2",
                                        ["run/checkpoint/tokenizer.json"], before=_resume_run),
    # finetune: instruct and classify data, the model, methods, options
    "ft bad device": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --train.device quantum", ["quantum"]),
    "ft jsonl bad line": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/bad.jsonl", ["bad.jsonl:2", "not valid JSON"],
                              sub=True),
    "ft record missing field": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/missing_field.jsonl",
                                    ["missing_field.jsonl:2", "prompt_template"]),
    "ft alpaca invalid json": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/alpaca_bad.json",
                                   ["alpaca_bad.json", "not valid JSON"]),
    "ft data not utf-8": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/latin1.jsonl", ["latin1.jsonl", "UTF-8"]),
    "ft data is a folder": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/emptydir", ["emptydir", "folder"]),
    "ft eval file missing": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --eval_file {{w}}/nope.jsonl",
                                 ["nope.jsonl", "does not exist"]),
    "ft forgetting data binary": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --forgetting_data {{w}}/ls",
                                      ["{w}/ls", "not UTF-8"]),
    "ft classify label line": Case(f"{FT} --model {{w}}/enc --task classify --data {{w}}/labels.txt",
                                   ["labels.txt:2", "<label> <text>"]),
    "ft classify jsonl bad line": Case(f"{FT} --model {{w}}/enc --task classify --data {{w}}/labels_bad.jsonl",
                                       ["labels_bad.jsonl:2", "not valid JSON"]),
    "ft unknown method": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method dora", ["method='dora'"]),
    "ft option of another method": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method prompt "
                                        "--peft.r 4", ["--peft.r", "prompt"]),
    "ft lora unknown target": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method lora "
                                   "--peft.targets qq", ["qq"]),
    "ft full with a lora option": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method full --peft.r 4",
                                       ["--peft.r", "'full'"]),
    "ft lora rank 0": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method lora --peft.r 0", ["r=0"]),
    "ft qlora odd block": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method qlora --peft.block_size 7",
                               ["block_size=7"]),
    "ft prompt too many tokens": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method prompt "
                                      "--peft.n_tokens 40", ["n_tokens=40", "context_length"]),
    "ft prefix zero tokens": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method prefix "
                                  "--peft.n_tokens 0", ["n_tokens=0"]),
    "ft adapter negative width": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method adapter "
                                      "--peft.bottleneck -1", ["bottleneck=-1"]),
    "ft bitfit with a lora option": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method bitfit "
                                         "--peft.r 2", ["--peft.r", "'bitfit'"]),
    "ft selective pattern matches nothing": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --method "
                                                 "selective --peft.patterns nomatch", ["'nomatch'"]),
    "ft model config invalid json": Case(f"{FT} --model {{w}}/ckpt_badjson --data {{w}}/good.jsonl",
                                         ["ckpt_badjson/config.json", "not valid JSON"]),
    "ft model pickle": Case(f"{FT} --model {{w}}/hf_pickle --method qlora --data {{w}}/good.jsonl",
                            ["pytorch_model.bin", "unpickle", "safetensors"]),
    "ft out under a file": Case(FT.replace("{t}/ft", "{w}/blocker/ft") + " --model {w}/ckpt --data {w}/good.jsonl",
                                ["{w}/blocker", "not a folder"]),
    "ft bad template": Case(f"{FT} --model {{w}}/ckpt --data {{w}}/good.jsonl --template alpaca",
                            ["template='alpaca'"]),
    # merge: adapters and the output
    "merge method.json invalid": Case("merge --model {w}/ckpt --adapter {w}/ad_badmethod --out {t}/m",
                                      ["ad_badmethod/method.json", "not valid JSON"]),
    "merge adapter_config.json not json": Case("merge --model {w}/ckpt --adapter {w}/ad_badpeft --out {t}/m",
                                               ["ad_badpeft/adapter_config.json", "not valid JSON"]),
    "merge truncated adapter": Case("merge --model {w}/ckpt --adapter {w}/ad_truncated --out {t}/m",
                                    ["ad_truncated/method.safetensors", "truncated"]),
    "merge adapter of another base": Case("merge --model {w}/ckpt --adapter {w}/ad_other --out {t}/m",
                                          ["ad_other", "base model"]),
    "merge adapter is a file": Case("merge --model {w}/ckpt --adapter {w}/text.txt --out {t}/m",
                                    ["text.txt", "not a folder"]),
    "merge bad format": Case("merge --model {w}/ckpt --adapter {w}/ad_lora --out {t}/m --format onnx",
                             ["format='onnx'"]),
    "merge out under a file": Case("merge --model {w}/ckpt --adapter {w}/ad_lora --out {w}/blocker/m",
                                   ["{w}/blocker", "not a folder"]),
    # generate: checkpoints, adapters, prompts, options
    "gen truncated weights": Case(f"{GEN} --model {{w}}/ckpt_truncated --prompt hi",
                                  ["ckpt_truncated/model.safetensors", "truncated"], sub=True),
    "gen garbage weights": Case(f"{GEN} --model {{w}}/ckpt_garbage --prompt hi",
                                ["ckpt_garbage/model.safetensors", "safetensors"]),
    "gen weights do not fit": Case(f"{GEN} --model {{w}}/ckpt_misfit --prompt hi", ["ckpt_misfit", "do not fit"]),
    "gen config bad field": Case(f"{GEN} --model {{w}}/ckpt_badfield --prompt hi",
                                 ["ckpt_badfield/config.json", "four"]),
    "gen config not an object": Case(f"{GEN} --model {{w}}/ckpt_listcfg --prompt hi",
                                     ["ckpt_listcfg/config.json", "object"]),
    "gen tokenizer garbage": Case(f"{GEN} --model {{w}}/ckpt_badtok --prompt hi",
                                  ["ckpt_badtok/tokenizer.json", "not a tokenizer"], sub=True),
    "gen tokenizer config garbage": Case(f"{GEN} --model {{w}}/ckpt_badtokcfg --prompt hi",
                                         ["ckpt_badtokcfg/tokenizer_config.json", "not valid JSON"]),
    "gen hf pickle": Case(f"{GEN} --model {{w}}/hf_pickle --prompt hi",
                          ["hf_pickle/pytorch_model.bin", "unpickle", "safetensors"], sub=True),
    "gen hf truncated bin": Case(f"{GEN} --model {{w}}/hf_truncated_bin --prompt hi",
                                 ["hf_truncated_bin/pytorch_model.bin"]),
    "gen hf index invalid": Case(f"{GEN} --model {{w}}/hf_badindex --prompt hi",
                                 ["hf_badindex/model.safetensors.index.json", "not valid JSON"]),
    "gen hf config bad field": Case(f"{GEN} --model {{w}}/hf_badfield --prompt hi", ["hf_badfield/config.json"]),
    "gen model is a file": Case(f"{GEN} --model {{w}}/text.txt --prompt hi", ["text.txt", "not a folder"]),
    "gen adapter garbage": Case(f"{GEN} --model {{w}}/ckpt --adapter {{w}}/ad_badmethod --prompt hi",
                                ["ad_badmethod/method.json", "not valid JSON"]),
    "gen prompt longer than context": Case(f"{GEN} --model {{w}}/ckpt --prompt {'a' * 40}", ["context_length=32"]),
    "gen prompt char unknown to tokenizer": Case(f"{GEN} --model {{w}}/ckpt --prompt 5\u20ac", ["'\u20ac'"]),
    "gen prompt file empty": Case(f"{GEN} --model {{w}}/ckpt --prompt_file {{w}}/empty.txt", ["no prompt given"]),
    "gen prompt file binary": Case(f"{GEN} --model {{w}}/ckpt --prompt_file {{w}}/ls", ["{w}/ls", "not UTF-8"]),
    "gen prompt file is a folder": Case(f"{GEN} --model {{w}}/ckpt --prompt_file {{w}}/emptydir",
                                        ["emptydir", "folder"]),
    "gen bad device": Case(f"{GEN} --model {{w}}/ckpt --prompt hi --device quantum", ["quantum"]),
    "gen bad top_p": Case(f"{GEN} --model {{w}}/ckpt --prompt hi --top_p 2", ["top_p=2"]),
    "gen negative max_new_tokens": Case("generate --model {w}/ckpt --prompt hi --max_new_tokens -3",
                                        ["max_new_tokens=-3"]),
    # embed
    "embed input file binary": Case("embed --model {w}/enc --input_file {w}/ls", ["{w}/ls", "not UTF-8"]),
    "embed causal model": Case("embed --model {w}/ckpt --text hi", ["encoder"]),
    "embed bad out suffix": Case("embed --model {w}/enc --text hi --out {t}/v.csv", ["v.csv", ".npy"]),
    "embed out under a file": Case("embed --model {w}/enc --text hi --out {w}/blocker/v.npy",
                                   ["{w}/blocker", "not a folder"]),
    # evaluate: task files, task data, metric files, the model, options
    "eval task invalid yaml": Case(f"{EV} --task {{w}}/bad.yaml", ["bad.yaml", "not valid YAML"]),
    "eval task yaml list": Case(f"{EV} --task {{w}}/list.yaml", ["list.yaml", "mapping"]),
    "eval task unknown key": Case(f"{EV} --task {{w}}/task_unknown.yaml", ["shots", "valid:"]),
    "eval task data bad line": Case(f"{EV} --task {{w}}/task_badjsonl.yaml", ["bad.jsonl:2", "not valid"]),
    "eval task data not utf-8": Case(f"{EV} --task {{w}}/task_latin1.yaml", ["latin1.jsonl", "UTF-8"]),
    "eval perplexity binary": Case(f"{EV} --task perplexity --data {{w}}/ls", ["{w}/ls", "not UTF-8"]),
    "eval perplexity missing": Case(f"{EV} --task perplexity --data {{w}}/nope.txt", ["nope.txt"]),
    "eval model config invalid": Case("evaluate --model {w}/ckpt_badjson --out {t}/r.json --task perplexity "
                                      "--data {w}/text.txt", ["ckpt_badjson/config.json", "not valid JSON"]),
    "eval bad shots": Case(f"{EV} --task perplexity --data {{w}}/text.txt --shots x", ["'x'"]),
    "eval metric predictions binary": Case("evaluate --metric rouge --predictions {w}/ls --references {w}/text.txt",
                                           ["{w}/ls", "not UTF-8"]),
    "eval metric misaligned": Case("evaluate --metric bleu --predictions {w}/labels.txt --references {w}/text.txt",
                                   ["text.txt", "aligned"]),
    "eval unknown metric": Case("evaluate --metric meteor --predictions {w}/text.txt --references {w}/text.txt",
                                ["meteor"]),
    "eval out under a file": Case("evaluate --metric bleu --predictions {w}/text.txt --references {w}/text.txt "
                                  "--out {w}/blocker/s.json", ["{w}/blocker", "not a folder"]),
    # convert
    "convert pickle": Case("convert {w}/hf_pickle {t}/out", ["pytorch_model.bin", "unpickle", "safetensors"]),
    "convert config invalid": Case("convert {w}/ckpt_badjson {t}/out", ["ckpt_badjson/config.json", "not valid"]),
    "convert truncated weights": Case("convert {w}/ckpt_truncated {t}/out --to hf", ["model.safetensors"]),
    "convert same folder": Case("convert {w}/ckpt {w}/ckpt --to lmforge", ["DST must differ"]),
    "convert bad target": Case("convert {w}/ckpt {t}/out --to onnx", ["onnx"]),
    "convert dst under a file": Case("convert {w}/ckpt {w}/blocker/out", ["{w}/blocker", "not a folder"]),
    # demo options
    "demo bad family": Case("demo --out_dir {t}/demo --family bogus", ["family='bogus'"]),
    "demo binary source": Case("demo --out_dir {t}/demo --data.sources {w}/ls", ["{w}/ls", "not UTF-8"]),
    "demo zero new tokens": Case("demo --out_dir {t}/demo --data.sources {w}/text.txt --max_new_tokens 0",
                                 ["max_new_tokens=0"]),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: any write shows up."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _run(case: Case, argv: list[str], capsys) -> tuple[int, str, str]:
    if case.sub:
        result = run_cli(*argv)
        return result.returncode, result.stdout, result.stderr
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, world, tmp_path, monkeypatch, capsys, one_thread):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here and be seen
    if case.before:
        case.before(world, tmp_path)
    before, world_before = _snapshot(tmp_path), _snapshot(world)
    argv = case.args.replace("{w}", str(world)).replace("{t}", str(tmp_path)).split()
    status, out, err = _run(case, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    for fragment in case.expect:
        assert fragment.replace("{w}", str(world)) in lines[0], (fragment, lines[0])
    assert _snapshot(tmp_path) == before, "a failed command left output behind"
    assert _snapshot(world) == world_before, "a failed command changed its inputs"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_os_error_no_check_foresaw_is_one_line_too(world, capsys):
    """/proc passes the up-front checks when run as root (os.access says yes) but refuses mkdir: the CLI's
    last-resort OSError line, naming the path."""
    status = main(["tokenizer", "train", "--tokenizer.kind", "char", "--data.sources", str(world / "text.txt"),
                   "--out", "/proc/lmforge-bad-inputs/tok"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("lmforge: error: "), err
    assert "/proc/lmforge-bad-inputs" in err and "Traceback" not in err


def test_there_are_many_cases_across_every_subcommand():
    commands = {" ".join(c.args.split()[:2]) if c.args.startswith("tokenizer") else c.args.split()[0]
                for c in CASES.values()}
    assert len(CASES) >= 30 and sum(c.sub for c in CASES.values()) >= 4
    assert commands == {"tokenizer train", "pretrain", "finetune", "merge", "generate", "embed", "evaluate",
                        "convert", "demo"}


def test_a_folder_with_one_binary_file_among_text_files_skips_it_with_a_warning(world, tmp_path, capsys):
    from lmforge.data.corpus import resolve_files

    folder = tmp_path / "mixed"
    shutil.copytree(world / "binfolder", folder)
    (folder / "good.txt").write_text("plain text\n")
    assert resolve_files([str(folder)]) == [folder / "good.txt"]
    warning = capsys.readouterr().err
    assert "a.txt" in warning and "not UTF-8" in warning and warning.count("\n") == 1


def test_a_bad_byte_past_the_first_block_still_names_the_file(tmp_path):
    from lmforge.data.corpus import read_documents
    from lmforge.errors import UserError

    path = tmp_path / "late.txt"
    path.write_bytes(b"x" * 200_000 + b"\xff\n")
    with pytest.raises(UserError, match=r"late.txt.*not UTF-8.*200000"):
        list(read_documents([path]))

