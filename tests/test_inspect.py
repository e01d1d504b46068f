"""`lmforge inspect`: every picture for every family is a real PNG; the attention probabilities captured are the
ones the model uses (they reproduce the fused SDPA output); the sampling picture's kept sets are filter_logits';
position and PCA numbers match hand computations; bad inputs are one-line errors."""

import io
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch

from conftest import SAMPLE_TEXT, assert_one_line_error, run_cli
from lmforge.checkpoint import save_model, write_atomically
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import filter_logits
from lmforge.inspect import attention_maps, pca_2d, read_word2vec, rope_scores, rule_effects
from lmforge.inspect.embeddings import token_vectors
from lmforge.models import Model, build_model
from lmforge.nn.attention import Attention, record_attention
from lmforge.recipes.inspect import InspectConfig, run_inspect
from lmforge.tokenizer import train_bpe, train_unigram, train_wordpiece

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRESETS = {"causal": "tiny", "masked": "tiny-bert", "seq2seq": "tiny-t5"}
ATTENTION_FILES = {"causal": ["attention_decoder.png"], "masked": ["attention_encoder.png"],
                   "seq2seq": ["attention_encoder.png", "attention_decoder.png", "attention_cross.png"]}
POSITION_FILES = {"causal": "positions_learned.png", "masked": "positions_learned.png",
                  "seq2seq": "positions_relative.png"}
PROMPT = "def greet(self):"


def tokenizer_for(family: str):
    lines = SAMPLE_TEXT.splitlines()
    if family == "masked":
        return train_wordpiece(lines, 200)
    if family == "seq2seq":
        return train_unigram(lines, 120, num_sentinels=5)
    return train_bpe(iter(lines), 300)


def write_run(folder: Path, family: str, **overrides) -> Path:
    """A run folder as pretrain leaves it: checkpoint/ (model + tokenizer) and metrics.jsonl."""
    torch.manual_seed(0)
    tokenizer = tokenizer_for(family)
    cfg = ModelConfig.from_preset(PRESETS[family], vocab_size=tokenizer.vocab_size, context_length=32, **overrides)
    model = build_model(cfg)
    write_atomically(folder / "checkpoint", lambda tmp: save_model(tmp, model, tokenizer))
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 900.0 + s, "mfu": 0.01} for s in
               range(1, 9)] + [{"step": 4, "val_loss": 4.8, "val_ppl": 121.5}, {"step": 8, "val_loss": 4.5,
                                                                                 "val_ppl": 90.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "checkpoint"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {family: write_run(root / family, family) for family in PRESETS}
    runs["recurrent"] = write_run(root / "lstm", "causal", arch="lstm")
    return runs


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"


@pytest.mark.parametrize("family", [*sorted(PRESETS), "recurrent"])
def test_every_picture_for_every_family_is_a_decodable_png(runs, family, tmp_path, capsys):
    what = ["sampling", "positions", "embeddings", "loss"] if family == "recurrent" else ["all"]
    pngs = run_inspect(InspectConfig(model=str(runs[family]), prompt=PROMPT, what=what, out=str(tmp_path)))
    names = sorted(p.name for p in pngs)
    expected = ["embeddings.png", "loss.png", "positions_rope.png", "positions_sinusoidal.png", "sampling.png",
                *([] if family == "recurrent" else [POSITION_FILES[family], *ATTENTION_FILES[family]])]
    assert names == sorted(expected)
    for png in pngs:
        assert_png(png)
    assert capsys.readouterr().out.split() == [str(p) for p in pngs]


def test_word2vec_vectors_get_their_own_pca(runs, tmp_path):
    vectors = torch.randn(6, 4)
    words = ["king", "queen", "man", "woman", "paris", "france"]
    lines = ["6 4"] + [" ".join([w, *(f"{v:.6f}" for v in row.tolist())])
                       for w, row in zip(words, vectors, strict=True)]
    (tmp_path / "w2v.txt").write_text("\n".join(lines) + "\n")
    read, names = read_word2vec(tmp_path / "w2v.txt", [], 60)
    assert names == words and torch.allclose(read, vectors, atol=1e-6)
    pngs = run_inspect(InspectConfig(model=str(runs["causal"]), what=["embeddings"], out=str(tmp_path / "pics"),
                                     word2vec=str(tmp_path / "w2v.txt"), tokens=["king", "paris", "man"]))
    assert [p.name for p in pngs] == ["embeddings.png", "word2vec.png"]
    for png in pngs:
        assert_png(png)


def _module_io(model: Model, inputs: dict) -> tuple[dict, list]:
    """The fused path's output of every self-attention module, with its input, and the recorded probabilities
    of a second, explicit pass."""
    seen = {}

    def keep(module, args, kwargs, output):
        seen[module] = (args[0] if args else kwargs["x"], output)

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in model.modules() if type(m) is Attention]
    with torch.no_grad():
        fused = model(**inputs).logits
        with record_attention() as records:
            explicit = model(**inputs).logits
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(explicit, fused, rtol=0, atol=2e-5)  # explicit softmax path == SDPA
    return seen, records


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-bert", "tiny-t5"])
def test_captured_attention_reproduces_each_modules_fused_output(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(preset)).eval()
    ids = torch.randint(5, 200, (2, 10))
    inputs = {"input_ids": ids, **({"labels": ids} if model.cfg.family == "seq2seq" else {})}
    seen, records = _module_io(model, inputs)
    self_records = [r for r in records if type(r.module) is Attention]
    assert len(self_records) == len(seen) > 0
    for record in self_records:
        attn, probs = record.module, record.probs
        x, fused_output = seen[attn]
        heads, kv = attn.n_heads, attn.n_kv_heads
        v = attn.qkv(x).view(*x.shape[:2], heads + 2 * kv, attn.head_dim)[:, :, heads + kv:].transpose(1, 2)
        v = v.repeat_interleave(heads // kv, dim=1)
        mixed = (probs @ v).transpose(1, 2).reshape(*x.shape[:2], -1)
        torch.testing.assert_close(attn.out(mixed), fused_output, rtol=0, atol=2e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-5)
        allowed = record.allowed.expand_as(probs)
        assert bool((probs[~allowed] == 0).all())
        if attn.causal:  # the causal mask is exactly the lower triangle
            assert torch.equal(allowed[0, 0], torch.ones(10, 10, dtype=torch.bool).tril())
        else:
            assert bool(allowed.all())


def test_padding_keys_get_zero_probability():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny")).eval()
    ids, mask = torch.randint(5, 200, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    with torch.no_grad(), record_attention() as records:
        model(ids, attention_mask=mask)
    probs = records[0].probs
    assert bool((probs[1, :, 3:, :3] == 0).all()) and bool((probs[0, :, :, :3] > 0).any())
    torch.testing.assert_close(probs[1, :, 3:].sum(-1), torch.ones(4, 5), rtol=0, atol=1e-5)


def test_attention_maps_label_queries_and_keys_per_kind(runs):
    from lmforge import load

    model, tokenizer = load(runs["seq2seq"])
    maps = attention_maps(model, tokenizer, PROMPT)
    source = tokenizer.encode(PROMPT, add_eos=True)
    kinds = [m.kind for m in maps]
    assert kinds.count("encoder") == model.cfg.n_layers and kinds.count("cross") == model.cfg.decoder_layers
    cross = next(m for m in maps if m.kind == "cross")
    assert len(cross.keys) == len(source) and cross.probs.shape[1:] == (len(cross.queries), len(source))


def test_sampling_picture_keeps_what_filter_logits_keeps():
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    effects = rule_effects(logits, 0.7, 5, 0.8)
    settings = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 5, 0.8)]
    for effect, (t, k, p) in zip(effects, settings, strict=True):
        assert torch.equal(effect.kept, torch.isfinite(filter_logits(logits, t, k, p)))
        torch.testing.assert_close(effect.after.sum(), torch.tensor(1.0))
        assert bool((effect.after[~effect.kept] == 0).all())
    assert int(effects[2].kept.sum()) == 5
    # top-p by hand: the most likely tokens until their mass first reaches 0.8
    probs, order = torch.softmax(logits, -1).sort(descending=True)
    size = int((probs.cumsum(0) < 0.8).sum()) + 1
    assert set(order[:size].tolist()) == set(effects[3].kept.nonzero().flatten().tolist())


def test_rope_scores_match_the_closed_form():
    head_dim, theta = 8, 10000.0
    scores = rope_scores(16, head_dim, theta)
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    expected = [2 * sum(math.cos(d * f) for f in frequencies.tolist()) for d in range(16)]
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def test_pca_finds_the_planted_axes():
    torch.manual_seed(0)
    a, b = torch.randn(40), torch.randn(40)
    basis = torch.linalg.qr(torch.randn(16, 16))[0]
    vectors = 10 * a[:, None] * basis[0] + 3 * b[:, None] * basis[1] + 0.01 * torch.randn(40, 16) + 5
    points, share = pca_2d(vectors)
    assert share[0] > 0.85 and share[1] > 0.05 and share[0] + share[1] > 0.999
    first = torch.corrcoef(torch.stack([points[:, 0], a]))[0, 1].abs()
    second = torch.corrcoef(torch.stack([points[:, 1], b]))[0, 1].abs()
    assert first > 0.999 and second > 0.999


def test_embeddings_of_a_word_are_the_mean_of_its_tokens(runs):
    from lmforge import load

    model, tokenizer = load(runs["causal"])
    vectors, labels = token_vectors(model, tokenizer, ["greet", "self"], 60, None)
    expected = model.embed.weight[tokenizer.encode("greet")].mean(0)
    assert labels == ["greet", "self"] and torch.allclose(vectors[0], expected)


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    def message(**kwargs) -> str:
        with pytest.raises(UserError) as caught:
            run_inspect(InspectConfig(out=str(tmp_path), **kwargs))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    with pytest.raises(UserError, match=r"--what heatmap is not one of: attention, sampling"):
        InspectConfig(what=["heatmap"])
    assert "more than the model's context_length=32" in message(model=str(runs["causal"]), prompt="word " * 40)
    assert "is not a folder" in message(model=str(tmp_path / "missing"))
    assert "no metrics.jsonl" in message(model=str(tmp_path), what=["loss"])
    assert "this lstm model has no attention to draw" in message(model=str(runs["recurrent"]))
    assert not (tmp_path / "never").exists()
    with pytest.raises(UserError):
        run_inspect(InspectConfig(out=str(tmp_path / "never"), model=str(tmp_path / "missing")))
    assert not (tmp_path / "never").exists()  # bad inputs leave no output folder behind


def test_the_command_line_takes_several_whats_and_fails_in_one_line(runs, tmp_path):
    result = run_cli("inspect", "--model", str(runs["causal"]), "--what", "attention", "pictures", "--out",
                     str(tmp_path))
    assert_one_line_error(result.stderr, "--what pictures is not one of: attention, sampling", result.returncode)
