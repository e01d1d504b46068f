"""Evaluation and in-context learning: perplexity, ROUGE, BLEU, exact match and accuracy; zero/one/few-shot
prompts; multiple choice by log-likelihood and generation scoring; a task suite defined by small YAML files.

    from lmforge.evaluate import load_task, evaluate_task
    report = evaluate_task(model, tokenizer, load_task("piqa"), shots=[0, 1, 5], limit=200)
"""

from lmforge.evaluate.harness import chance_level, evaluate_task, extract_answer, format_table, plot_shots_curve
from lmforge.evaluate.metrics import (
    Perplexity,
    accuracy,
    bleu,
    classifier_accuracy,
    exact_match,
    extract_number,
    normalize_number,
    normalize_text,
    perplexity,
    rouge,
    rouge_scores,
    window_plan,
)
from lmforge.evaluate.prompts import Example, Prompt, PromptSpec, build_prompt, demonstration, draw_shots, query_text
from lmforge.evaluate.scoring import ChoiceScores, generate_answers, loglikelihoods, score_choices
from lmforge.evaluate.tasks import DataSpec, Task, TaskSpec, data_root, known_tasks, load_task, perplexity_task

__all__ = [
    "ChoiceScores", "DataSpec", "Example", "Perplexity", "Prompt", "PromptSpec", "Task", "TaskSpec", "accuracy",
    "bleu", "build_prompt", "chance_level", "classifier_accuracy", "data_root",
    "demonstration", "draw_shots", "evaluate_task",
    "exact_match", "extract_answer", "extract_number", "format_table", "generate_answers", "known_tasks",
    "load_task", "loglikelihoods", "normalize_number", "normalize_text", "perplexity", "perplexity_task",
    "plot_shots_curve", "query_text", "rouge", "rouge_scores", "score_choices", "window_plan",
]
