"""Evaluation: metrics against their reference packages and by hand, prompts, scoring, the task suite."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from conftest import make_model
from lmforge.config import ModelConfig
from lmforge.data.batches import RandomWindows
from lmforge.errors import UserError
from lmforge.evaluate import (
    ChoiceScores,
    Example,
    PromptSpec,
    bleu,
    build_prompt,
    data_root,
    draw_shots,
    evaluate_task,
    exact_match,
    extract_number,
    generate_answers,
    known_tasks,
    load_task,
    loglikelihoods,
    normalize_number,
    perplexity,
    rouge,
    score_choices,
    window_plan,
)
from lmforge.evaluate.scoring import choice_requests, describe_start, prompt_tokens, resolve_start
from lmforge.generate import SamplingConfig, generate_text
from lmforge.interop import load
from lmforge.models import Seq2SeqLM
from lmforge.tokenizer import train_bpe, train_char
from lmforge.train import TrainConfig, train

DATA = data_root()
WMT = DATA / "translation"
needs_wmt = pytest.mark.skipif(not (WMT / "wmt22.automatic-scores.tsv").is_file(), reason="shared/data absent")

# A planted association the tiny model learns: each colour has one answer.
PLANTED = {"red": "left", "blue": "right", "green": "left", "black": "right", "white": "left", "pink": "right"}


def planted_corpus(docs: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(f"Question: {q}\nAnswer: {PLANTED[q]}\n\n" for q in rng.choices(sorted(PLANTED), k=docs))


def train_planted(steps: int = 200):
    """A 2-layer char-level CausalLM trained to answer PLANTED (150 steps suffice; a few seconds)."""
    corpus = planted_corpus()
    tokenizer = train_char([corpus])
    model = make_model("tiny", seed=0, vocab_size=tokenizer.vocab_size, context_length=64)
    batches = RandomWindows(np.asarray(tokenizer.encode(corpus)), batch_size=16, context=64)
    train(model, batches, TrainConfig(steps=steps, lr=3e-3, warmup_steps=20, log_every=50, progress=False,
                                      device="cpu"))
    return model.eval(), tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models lose much from a second thread on a shared CPU


@pytest.fixture(scope="module")
def planted(one_thread):
    return train_planted()


# -- BLEU ------------------------------------------------------------------------------------------------------------
def official_score(metric: str) -> float:
    with (WMT / "wmt22.automatic-scores.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if (row["pair"], row["system"], row["metric"]) == ("en-de", "OpenNMT", metric):
                return float(row["score"])
    raise AssertionError(f"no {metric} row for en-de OpenNMT")


def wmt_lines(name: str) -> list[str]:
    return (WMT / f"wmt22.generaltest2022.en-de.{name}").read_text(encoding="utf-8").splitlines()


@needs_wmt
def test_bleu_equals_the_official_wmt22_score():
    hyp, ref_a, ref_b = wmt_lines("hyp.OpenNMT.de"), wmt_lines("ref.A.de"), wmt_lines("ref.B.de")
    one = bleu(hyp, [[a] for a in ref_a])
    assert one["bleu"] == pytest.approx(official_score("bleu-A"), abs=1e-9)  # 35.6851...
    assert one["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    both = bleu(hyp, [[a, b] for a, b in zip(ref_a, ref_b, strict=True)])
    assert both["bleu"] == pytest.approx(official_score("bleu-all"), abs=1e-9)
    assert "nrefs:2" in both["signature"]


def test_bleu_self_contained_case():
    # Equal lengths (BP = 1); n-gram precisions 5/6, 4/5, 3/4, 2/3 -> BLEU = (1/3)^(1/4).
    result = bleu(["a b c d e f"], [["a b c d e g"]])
    assert result["bleu"] == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-9)
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])["bleu"] == pytest.approx(100)
    # Examples may have different numbers of references.
    varied = bleu(["a b c d e f", "x y z w"], [["a b c d e g", "a b c d e f"], ["x y z w"]])
    assert varied["bleu"] == pytest.approx(100) and "nrefs:var" in varied["signature"]


def test_bleu_and_rouge_reject_misaligned_inputs():
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(UserError, match="example 1 has no reference"):
        rouge(["a"], [[]])


# -- ROUGE ------------------------------------------------------------------------------------------------------------
PAIRS = [
    ("the cats are running in the garden", ["a cat runs in the garden", "cats were running outside"]),
    ("#Person1# asks for a dictation of a memo", ["Ms. Dawson takes a dictation of a memo for #Person1#."]),
    ("nothing in common", ["entirely different words here"]),
]


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_equals_rouge_score_called_directly(stem):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    direct = [scorer.score_multi(refs, pred) for pred, refs in PAIRS]
    ours = rouge([p for p, _ in PAIRS], [r for _, r in PAIRS], use_stemmer=stem)
    for kind in ("rouge1", "rouge2", "rougeL"):
        for part in ("precision", "recall", "fmeasure"):
            expected = 100 * sum(getattr(d[kind], part) for d in direct) / len(direct)
            assert ours[kind][part] == pytest.approx(expected, abs=1e-12)
    single = scorer.score("a cat runs in the garden", PAIRS[0][0])["rouge1"].fmeasure
    assert rouge([PAIRS[0][0]], [["a cat runs in the garden"]], use_stemmer=stem)["rouge1"]["fmeasure"] == \
        pytest.approx(100 * single)


def test_stemming_changes_rouge():
    pred, refs = ["the cats are running"], [["the cat runs"]]
    assert rouge(pred, refs, use_stemmer=True)["rouge1"]["fmeasure"] > rouge(pred, refs, False)["rouge1"]["fmeasure"]


# -- exact match and answer extraction --------------------------------------------------------------------------------
def test_number_extraction_and_exact_match():
    assert extract_number("She pays 5*5=$25.\n#### 1,000") == "1000"
    assert extract_number("so 3 + 4 = 7. The answer is $18.00.") == "18"
    assert extract_number("first 3 then -5") == "-5"
    assert extract_number("no digits") == ""
    assert normalize_number("2.50") == "2.5"
    assert exact_match(["Positive.", "no"], [["positive"], ["yes", "nope"]]) == 50.0
    assert exact_match(["Positive."], [["positive"]], normalize=False) == 0.0


# -- perplexity -------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(1, 64), stride_part=st.floats(0.01, 1.0))
def test_window_plan_scores_every_token_once_with_enough_context(n, context, stride_part):
    stride = max(1, int(context * stride_part))
    scored = []
    for begin, end, new in window_plan(n, context, stride):
        assert 1 <= new <= end - begin <= context
        for target in range(end + 1 - new, end + 1):
            scored.append(target)
            left = target - begin  # tokens of context the target sees in its window
            assert left >= min(target, context - stride + 1) or begin == 0
    assert scored == list(range(1, n))


def nll_by_hand(model, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ids[1:] given everything before, in one forward pass."""
    logits = model(ids[None, :-1]).logits[0].float()
    return F.cross_entropy(logits, ids[1:], reduction="sum").item(), len(ids) - 1


def test_perplexity_equals_exp_mean_nll_by_hand():
    model = make_model("tiny", seed=3)
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))
    total, count = nll_by_hand(model, ids)
    one_window = perplexity(model, ids, context=64)
    assert one_window.windows == 1 and one_window.tokens == 49
    assert one_window.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    # Chopped into windows of 16 by hand: each chunk of 17 tokens scores its last 16 given the chunk alone.
    long_ids = torch.randint(0, 256, (161,), generator=torch.Generator().manual_seed(1))
    parts = [nll_by_hand(model, long_ids[i:i + 17]) for i in range(0, 160, 16)]
    chopped = perplexity(model, long_ids, context=16, stride=16, batch_size=3)
    assert chopped.windows == 10
    assert chopped.nll == pytest.approx(sum(p[0] for p in parts) / sum(p[1] for p in parts), rel=1e-5)
    assert perplexity(model, long_ids, 16, 4, batch_size=1).nll == pytest.approx(
        perplexity(model, long_ids, 16, 4, batch_size=8).nll, rel=1e-5)


def test_sliding_window_is_not_worse_than_chopped_on_a_long_text(planted):
    model, tokenizer = planted
    ids = tokenizer.encode(planted_corpus(docs=40, seed=7))
    sliding = perplexity(model, ids, context=32, stride=8)
    chopped = perplexity(model, ids, context=32, stride=32)
    assert sliding.tokens == chopped.tokens == len(ids) - 1
    assert sliding.perplexity <= chopped.perplexity
    assert sliding.windows > chopped.windows


def test_perplexity_errors():
    model = make_model("tiny")
    with pytest.raises(UserError, match="stride=40 must be in"):
        perplexity(model, list(range(100)), context=32, stride=40)
    with pytest.raises(UserError, match="context=100 must be in"):
        perplexity(model, list(range(100)), context=100)


# -- prompts ----------------------------------------------------------------------------------------------------------
SPEC = PromptSpec(instruction="Answer the question.", input="Question: {q}", answer_prefix="Answer:")


def examples(n: int) -> list[Example]:
    return [Example(i, {"q": f"q{i}"}, [f"<a{i}>"]) for i in range(n)]


@pytest.mark.parametrize("k", [0, 1, 2, 5, 8])
def test_few_shot_prompts_have_exactly_k_examples_never_the_query(k):
    pool = examples(30)  # the pool is the test split itself: the query must be skipped
    for query in pool:
        shots = draw_shots(pool, k, seed=7, query=query, spec=SPEC)
        prompt = build_prompt(SPEC, query, shots)
        assert len(prompt.shots) == k and prompt.dropped == 0 and query.index not in prompt.shots
        assert prompt.text.count("Answer:") == k + 1 and prompt.text.count("Question:") == k + 1
        assert f"<a{query.index}>" not in prompt.text  # the query's own answer is never shown
        assert prompt.text.startswith("Answer the question.\n\n")
        assert prompt.text.endswith(f"Question: q{query.index}\nAnswer:")


def test_shot_draws_are_reproducible_and_nested():
    pool, query = examples(100), Example(1000, {"q": "new"}, ["x"])
    five = [e.index for e in draw_shots(pool, 5, 1, query, SPEC)]
    assert five == [e.index for e in draw_shots(pool, 5, 1, query, SPEC)]
    assert five != [e.index for e in draw_shots(pool, 5, 2, query, SPEC)]
    assert [e.index for e in draw_shots(pool, 2, 1, query, SPEC)] == five[:2]  # a shots curve adds examples
    other = Example(1001, {"q": "other"}, ["y"])
    assert five != [e.index for e in draw_shots(pool, 5, 1, other, SPEC)]  # each query gets its own draw
    with pytest.raises(UserError, match="only 3 usable examples"):
        draw_shots(examples(4), 5, 1, examples(4)[0], SPEC)


def test_truncation_drops_examples_never_the_query():
    pool = examples(10)
    query = Example(99, {"q": "the query " * 5}, ["z"])
    shots = draw_shots(pool, 5, 0, query, SPEC)
    full = build_prompt(SPEC, query, shots)
    prompt = build_prompt(SPEC, query, shots, fits=lambda text: len(text) <= len(full.text) - 30)
    assert 0 < prompt.dropped < 5 and len(prompt.shots) == 5 - prompt.dropped
    assert prompt.shots == [s.index for s in shots][prompt.dropped:]  # those nearest the query stay
    assert prompt.text.endswith(f"Question: {query.fields['q']}\nAnswer:") and prompt.fits
    nothing_fits = build_prompt(SPEC, query, shots, fits=lambda text: False)
    assert nothing_fits.shots == [] and not nothing_fits.fits and "the query" in nothing_fits.text


def test_chain_of_thought_layout():
    spec = PromptSpec(input="Q: {q}", answer_prefix="A:", chain_of_thought=True, reasoning="{why}")
    shot = Example(0, {"q": "2+2?", "why": "Two and two make 4"}, ["4"])
    query = Example(1, {"q": "3+3?", "why": "secret"}, ["6"])
    text = build_prompt(spec, query, [shot]).text
    assert text == ("Q: 2+2?\nA: Let's think step by step. Two and two make 4. The answer is 4.\n\n"
                    "Q: 3+3?\nA: Let's think step by step.")
    assert build_prompt(spec, query, []).text.endswith("A: Let's think step by step.")


# -- scoring ----------------------------------------------------------------------------------------------------------
def test_loglikelihood_equals_the_sum_of_token_log_probs_and_batching_changes_nothing():
    model = make_model("tiny", seed=1)
    requests = [([5, 6, 7], [8, 9]), ([1] * 20, [3]), ([2, 4], [6, 8, 10, 12])]
    batched = loglikelihoods(model, requests, batch_size=3)
    for (context, cont), (score, _, truncated) in zip(requests, batched, strict=True):
        ids = torch.tensor(context + cont)
        logprobs = F.log_softmax(model(ids[None, :-1]).logits[0].float(), -1)
        by_hand = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(by_hand, abs=1e-4) and not truncated
        assert loglikelihoods(model, [(context, cont)], batch_size=1)[0][0] == pytest.approx(score, abs=1e-4)
    long = loglikelihoods(model, [(list(range(100)), [1, 2])])[0]
    assert long[2]  # 102 tokens > context 64 + 1: the context was cut from the left


def test_seq2seq_loglikelihood_and_generation():
    tokenizer = train_char(["abcdefgh xyz"], specials={"pad": "<pad>", "eos": "</s>"})
    torch.manual_seed(0)
    model = Seq2SeqLM(ModelConfig.from_preset("tiny-t5", vocab_size=tokenizer.vocab_size)).eval()
    source, target = tokenizer.encode("abc", add_eos=True), tokenizer.encode("xyz")
    score = loglikelihoods(model, [(source, target)])[0][0]
    loss = model(torch.tensor([source]), labels=torch.tensor([target])).loss.item()
    assert score == pytest.approx(-loss * len(target), abs=1e-4)
    [(text, truncated)] = generate_answers(model, tokenizer, ["abc"], SamplingConfig(max_new_tokens=4, greedy=True))
    assert text == generate_text(model, tokenizer, ["abc"], SamplingConfig(max_new_tokens=4, greedy=True))[0]
    assert not truncated
    # lm-eval's seq2seq requests: the context as the tokenizer encodes it (this one adds no EOS), the
    # continuation, its leading space kept, without special tokens
    assert choice_requests(model, tokenizer, "abc", [" xyz"], start="tokenizer") == \
        [(tokenizer.encode("abc"), tokenizer.encode(" xyz"))]
    assert choice_requests(model, tokenizer, "abc", [" xyz"]) == [(source, target)]


def test_length_normalised_choice_prefers_the_better_per_byte_choice():
    scores = ChoiceScores(loglikelihoods=[-4.0, -6.0], byte_lengths=[2, 12], greedy=[False, False], truncated=False)
    assert scores.prediction == 0 and scores.prediction_norm == 1


def test_multiple_choice_picks_the_planted_answer(planted):
    model, tokenizer = planted
    prompts = [f"Question: {q}\nAnswer:" for q in PLANTED]
    scored = score_choices(model, tokenizer, prompts, [["left", "right"]] * len(PLANTED))
    picked = [["left", "right"][s.prediction] for s in scored]
    assert picked == list(PLANTED.values())
    assert all(s.greedy[s.prediction] for s in scored)


def test_generation_matches_generate_text_and_cuts_at_stop(planted):
    model, tokenizer = planted
    cfg = SamplingConfig(max_new_tokens=8, greedy=True, stop=["\n"])
    prompts = [f"Question: {q}\nAnswer:" for q in PLANTED]
    outputs = generate_answers(model, tokenizer, prompts, cfg, batch_size=4)
    assert [text for text, _ in outputs] == generate_text(model, tokenizer, prompts, cfg)
    assert [text.strip() for text, _ in outputs] == list(PLANTED.values())


def test_harness_on_a_task_yaml_of_ones_own(planted, tmp_path):
    model, tokenizer = planted
    rows = [{"colour": q, "side": a} for q, a in PLANTED.items()]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "kind: multiple_choice\ntest: {path: qa.jsonl}\nchoices: [left, right]\nlabel: side\n"
        "prompt: {input: 'Question: {colour}', answer_prefix: 'Answer:'}\n")
    report = evaluate_task(model, tokenizer, load_task(str(tmp_path / "mc.yaml")), shots=[0, 1, 3], log=None)
    assert report["chance"] == 50.0
    for k in ("0", "1"):
        result = report["results"][k]
        assert result["score"] == 100.0 and result["n"] == 6 and result["mean_shots"] == int(k)
        record = result["examples"][0]
        assert record["correct"] and len(record["shot_ids"]) == int(k) and record["prompt"].endswith("Answer:")
    three = report["results"]["3"]  # three examples do not fit a 64-character context: some are dropped
    assert three["mean_shots"] < 3 and three["score"] == 100.0
    assert report["start"] == "eos" and report["start_tokens"].startswith("eos (lmforge's): every prompt starts after")


# -- start conventions: lm-evaluation-harness's ("tokenizer") and lmforge's ("eos") -----------------------------------
QA_TEXT = ["Question: is the sky blue?\nAnswer: yes\n\n", "Question: is grass red?\nAnswer: no\n\n"] * 40


def hf_gpt2_folder(tmp_path):
    """A tiny GPT-2 folder as transformers writes it, with a GPT-2-style tokenizer: <|endoftext|> is BOS and
    EOS, and the tokenizer adds nothing to a text."""
    transformers = pytest.importorskip("transformers")
    tokenizer = train_bpe(iter(QA_TEXT), vocab_size=300, specials={"bos": "<|endoftext|>", "eos": "<|endoftext|>"})
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64,
                                                              n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        for p in hf.parameters():  # big enough weights that the start token changes the scores
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    return tmp_path / "hf"


def hand_loglikelihood(hf_model, context: list[int], continuation: list[int]) -> float:
    """sum log p(continuation | context) from the transformers model, token by token."""
    with torch.no_grad():
        logprobs = F.log_softmax(hf_model(torch.tensor([context + continuation[:-1]])).logits[0].float(), -1)
    return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_start_conventions_equal_a_transformers_hand_computation_on_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = hf_gpt2_folder(tmp_path)
    model, tokenizer = load(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt, choices = "Question: is the sky blue?\nAnswer:", ["yes", "no", "maybe so"]
    eos = hf_tok.eos_token_id
    assert hf_tok.encode(prompt) == hf_tok.encode(prompt, add_special_tokens=False)  # GPT-2's adds no BOS
    scores = {start: score_choices(model, tokenizer, [prompt], [choices], start=start)[0].loglikelihoods
              for start in ("tokenizer", "eos")}
    for i, choice in enumerate(choices):
        # lm-eval's ids: encode(context + continuation) split after encode(context), nothing prepended
        context, whole = hf_tok.encode(prompt), hf_tok.encode(prompt + " " + choice)
        continuation = whole[len(context):]
        assert scores["tokenizer"][i] == pytest.approx(hand_loglikelihood(hf_model, context, continuation), abs=1e-4)
        assert scores["eos"][i] == pytest.approx(hand_loglikelihood(hf_model, [eos, *context], continuation),
                                                 abs=1e-4)
        assert abs(scores["tokenizer"][i] - scores["eos"][i]) > 1e-3  # the conventions really differ here
    # lm-eval's edge cases: an empty context is the prefix token (BOS, else EOS); trailing spaces of the context
    # move to the continuation; a context already starting with the BOS text gets no second one
    assert choice_requests(model, tokenizer, "", [" yes"], start="tokenizer") == \
        [([eos], hf_tok.encode(" yes", add_special_tokens=False))]
    assert choice_requests(model, tokenizer, "Answer: ", ["yes"], start="tokenizer") == \
        choice_requests(model, tokenizer, "Answer:", [" yes"], start="tokenizer")
    # generation reads the prompt the same way: as the tokenizer encodes it, or after EOS
    assert prompt_tokens(model, tokenizer, prompt, "tokenizer") == hf_tok(prompt).input_ids
    assert prompt_tokens(model, tokenizer, prompt, "eos") == [eos, *hf_tok(prompt).input_ids]


def test_the_tokenizer_convention_keeps_the_bos_a_llama_style_tokenizer_adds(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = train_bpe(iter(QA_TEXT), vocab_size=300, specials={"bos": "<s>", "eos": "</s>"})
    tokenizer.backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                     special_tokens=[("<s>", tokenizer.bos_id)])
    tokenizer.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = make_model("tiny-llama", vocab_size=tokenizer.vocab_size)
    prompt = "Question: is grass red?\nAnswer:"
    context, continuation = hf_tok.encode(prompt), hf_tok.encode(prompt + " no")[len(hf_tok.encode(prompt)):]
    assert context[0] == tokenizer.bos_id
    for start in ("tokenizer", "eos"):  # both read BOS first, as Llama was trained
        assert choice_requests(model, tokenizer, prompt, [" no"], start=start) == [(context, continuation)]
    assert choice_requests(model, tokenizer, "<s>Question:", [" no"], start="tokenizer")[0][0] == \
        hf_tok.encode("<s>Question:", add_special_tokens=False)  # no second BOS
    assert "here <s> (id" in describe_start(model, tokenizer, "tokenizer")


def test_auto_start_and_bad_conventions():
    assert resolve_start("auto", hf_folder=True) == "tokenizer" and resolve_start("auto", hf_folder=False) == "eos"
    assert resolve_start("eos", hf_folder=True) == "eos"
    with pytest.raises(UserError, match="start='bos' is not a start convention"):
        score_choices(make_model("tiny"), train_char(["ab"]), ["a"], [["b"]], start="bos")


# -- the task suite ---------------------------------------------------------------------------------------------------
def test_every_built_in_task_loads_its_data():
    names = set(known_tasks())
    assert {"dialogsum", "wmt22-en-de", "multi30k-en-de", "piqa", "gsm8k", "gsm8k-cot", "sst2"} <= names
    if not (DATA / "fewshot").is_dir():
        pytest.skip("shared/data absent")
    for name in sorted(names):
        task = load_task(name)
        task.check_files()
        if task.spec.kind == "perplexity":
            assert len(task.texts()[0]) > 1000
            continue
        first = task.examples(limit=3)
        assert len(first) == 3
        if task.spec.kind == "multiple_choice":
            assert all(ex.label in (0, 1) and len(ex.choices) == 2 for ex in first)
        else:
            assert all(ex.references and all(ex.references) for ex in first)
    assert len(load_task("dialogsum").examples()[0].references) == 3
    assert load_task("gsm8k").examples(1)[0].references == ["18"]
    assert [ex.label for ex in load_task("piqa").examples(3)] == [0, 1, 1]
    assert len(load_task("wmt22-en-de").examples()) == 2037


def test_task_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=r"unknown task 'nope'; known tasks: .*piqa"):
        load_task("nope")
    task = load_task("piqa", root=tmp_path)
    with pytest.raises(UserError, match=r"needs 'fewshot/piqa\.valid\.jsonl'.*--data_root"):
        task.check_files()
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: multiple_choice\ntest: {path: x.jsonl}\nchoices: [a]\n")
    with pytest.raises(UserError, match="at least 2 choices"):
        load_task(str(bad))
    bad.write_text("kind: generate\ntest: {path: x.jsonl}\nreferences: ['{a}']\nmetrik: bleu\n")
    with pytest.raises(UserError, match=r"unknown option.*metrik"):
        load_task(str(bad))
    (tmp_path / "x.jsonl").write_text('{"q": "1"}\n')
    bad.write_text("kind: generate\ntest: {path: x.jsonl}\nreferences: ['{answer}']\n")
    with pytest.raises(UserError, match="field 'answer' that the data lacks; fields are: q"):
        load_task(str(bad)).examples()


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    assert data_root() == Path(tmp_path)
    assert data_root("elsewhere") == Path("elsewhere")
