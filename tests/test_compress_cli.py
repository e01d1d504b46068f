"""`lmforge quantize` end to end: every method writes a compressed folder that `lmforge.load`, generate, evaluate and
finetune read with no extra flag, the report measures what it says, and mistakes get one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLE_TEXT, assert_one_line_error, make_model, perturb, run_cli
from lmforge.checkpoint import load as load_plain
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.compress.storage import read_compression
from lmforge.errors import UserError
from lmforge.evaluate.metrics import perplexity
from lmforge.interop import load
from lmforge.recipes.compress_common import REPORT_FILE, CompressData, heldout_ids
from lmforge.recipes.quantize import QuantizeConfig, run_quantize
from lmforge.tokenizer import train_char

METHODS = ["fp16", "bf16", "int8", "int8-dynamic", "int4", "nf4", "gptq"]
DATA = ["--data.calibration_samples", "4", "--data.heldout_tokens", "600", "--data.decode_tokens", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny causal checkpoint (char tokenizer over SAMPLE_TEXT, moved off its init so rounding matters) and the
    text it is measured on."""
    w = tmp_path_factory.mktemp("compress")
    (w / "text.txt").write_text(SAMPLE_TEXT)
    tokenizer = train_char([SAMPLE_TEXT])
    model = make_model("tiny", vocab_size=tokenizer.vocab_size)
    perturb(model, seed=1)
    save(w / "ckpt", model, tokenizer)
    return w


def quantize_args(w, method: str, out: str, *extra: str) -> list[str]:
    return ["quantize", "--model", str(w / "ckpt"), "--method", method, "--out", str(w / out),
            "--data.sources", str(w / "text.txt"), "--group_size", "32", "--block_size", "32", *DATA, *extra]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_and_reports(world, method, capsys):
    assert main(quantize_args(world, method, method)) == 0
    out = world / method
    record = read_compression(out)["quantization"]
    assert record["method"] == method
    model, tokenizer = load(out)
    original, _ = load(world / "ckpt")
    ids = torch.tensor([tokenizer.encode(SAMPLE_TEXT[:50])])
    with torch.no_grad():
        got, want = model(ids).logits.float(), original(ids).logits
    # the quantized model is close to the original, and not equal to it (something was rounded)
    assert 0 < (got - want).abs().max() < 0.5 * want.abs().max()
    report = json.loads((out / REPORT_FILE).read_text())
    data = CompressData(sources=[str(world / "text.txt")], heldout_tokens=600)
    expected = perplexity(original, heldout_ids(data, tokenizer)).perplexity
    assert report["original"]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert report["compressed"]["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    bound = {"fp16": 2.01, "bf16": 2.01, "int8": 2.5, "int8-dynamic": 2.5, "int4": 2.0, "nf4": 2.0, "gptq": 2.0}
    assert report["compressed"]["bytes_per_parameter"] < bound[method] < report["original"]["bytes_per_parameter"]
    assert "perplexity" in capsys.readouterr().out


def test_a_quantized_folder_loads_exactly_as_it_was_saved(world):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "int4-exact"), method="int4",
                                group_size=32, report=False))
    from lmforge.compress.quant import quantize_model

    model, tokenizer = load(world / "ckpt")
    quantize_model(model, "int4", bits=4, group_size=32)
    loaded, _ = load(world / "int4-exact")
    ids = torch.tensor([tokenizer.encode(SAMPLE_TEXT[:40])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_half_precision_keeps_its_dtype_on_load(world):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "half"), method="bf16", report=False))
    model, _ = load(world / "half")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_generate_and_evaluate_read_a_quantized_folder_without_flags(world):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "nf4-cli"), method="nf4",
                                block_size=32, report=False))
    done = run_cli("generate", "--model", str(world / "nf4-cli"), "--prompt", "def ", "--max_new_tokens", "5",
                   "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ")
    assert main(["evaluate", "--model", str(world / "nf4-cli"), "--task", "perplexity", "--data",
                 str(world / "text.txt"), "--limit", "300", "--out", str(world / "eval.json")]) == 0


def test_the_plain_loader_points_to_lmforge_load(world):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "int8-plain"), method="int8",
                                report=False))
    with pytest.raises(UserError, match=r"lmforge\.load"):
        load_plain(world / "int8-plain")


@pytest.mark.parametrize("args, message", [
    (["--method", "int2"], "int2"),
    (["--method", "gptq", "--bits", "5"], "bits=5"),
    (["--method", "int4", "--group_size", "48"], "48"),
    (["--method", "int8", "--damp", "0"], "damp=0"),
])
def test_bad_options_give_one_line_errors(world, args, message, capsys):
    base = quantize_args(world, "int8", "bad")
    status = main([*base, *args])
    assert_one_line_error(capsys.readouterr().err, message, status)
    assert not (world / "bad").exists()


def test_quantizing_a_quantized_checkpoint_or_into_its_source_is_refused(world, capsys):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "once"), method="int8", report=False))
    status = main(["quantize", "--model", str(world / "once"), "--method", "int4", "--out", str(world / "twice")])
    assert_one_line_error(capsys.readouterr().err, "already quantized", status)
    status = main(["quantize", "--model", str(world / "ckpt"), "--method", "int8", "--out", str(world / "ckpt")])
    assert_one_line_error(capsys.readouterr().err, "input model's folder", status)
    status = main(["quantize", "--method", "int8", "--out", str(world / "x")])
    assert_one_line_error(capsys.readouterr().err, "--model", status)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_finetune_keeps_a_4bit_base_as_it_is_and_generate_applies_the_adapter(world, method):
    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / f"nf4-{method}"), method="nf4",
                                block_size=32, report=False))
    (world / "pairs.jsonl").write_text('{"prompt": "def ", "completion": "fibonacci(n):"}\n' * 8)
    run = world / f"ft-{method}"
    assert main(["finetune", "--model", str(world / f"nf4-{method}"), "--data", str(world / "pairs.jsonl"),
                 "--method", method, "--out_dir", str(run), "--train.steps", "3", "--train.batch_size", "2",
                 "--train.progress", "false"]) == 0
    done = run_cli("generate", "--model", str(world / f"nf4-{method}"), "--adapter", str(run / "checkpoint"),
                   "--prompt", "def ", "--max_new_tokens", "4", "--temperature", "0")
    assert done.returncode == 0, done.stderr


def test_serve_answers_from_a_quantized_folder_as_generate_does(world):
    import httpx
    from test_serve import running

    from lmforge.generate import SamplingConfig, generate_text
    from lmforge.recipes.serve import ServeConfig, build_app

    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "served"), method="int8-dynamic",
                                report=False))
    model, tokenizer = load(world / "served")
    expected = generate_text(model, tokenizer, ["def "], SamplingConfig(max_new_tokens=6, temperature=0.0))[0]
    with running(build_app(ServeConfig(model=str(world / "served"), device="cpu"))) as url:
        reply = httpx.post(f"{url}/completions", json={"model": "served", "prompt": "def ", "max_tokens": 6,
                                                       "temperature": 0}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected
