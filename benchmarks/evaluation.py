"""Evaluation throughput: answers per second of what ``nsteer eval`` does per batch, generation and scoring.

Per batch size: ``nsteer.generate.generate`` (steered, EOS-stopped) of a set of prompts, then the perplexity of
every answer under the model itself (``nsteer eval``'s default reference), both in batches of that size.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.fixtures import BenchModel, base_prompts, edit_layers, set_edits
from benchmarks.harness import rounds, timed


@dataclass(frozen=True)
class EvaluationSettings:
    """Sizes and repeats of the evaluation-throughput section."""

    prompts: int = 64
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)  # 8 was generation.batch_size's default before 32
    max_rounds: int = 2
    budget_s: float = 120.0


def bench_eval_throughput(
    model: BenchModel, settings: EvaluationSettings, device: str, vector: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Answers per second (generation plus perplexity scoring) per batch size, and the scoring's share of the time."""
    from nsteer.evaluate.quality import perplexity
    from nsteer.generate import GenerationConfig, generate

    handle = model.handle
    prompts = base_prompts(settings.prompts)
    edits = set_edits(vector, edit_layers(handle.n_layers, 1))
    scoring: dict[str, list[float]] = {str(size): [] for size in settings.batch_sizes}

    def evaluate(size: int) -> None:
        answers = generate(
            handle, prompts, edits, config=GenerationConfig(max_new_tokens=settings.new_tokens, batch_size=size)
        )
        scored = timed(lambda: perplexity(handle.hf_model, handle.tokenizer, prompts, answers, batch_size=size), device)
        scoring.setdefault(str(size), []).append(scored[0])

    evaluate(2)  # warm-up
    variants = {str(size): (lambda size=size: evaluate(size)) for size in settings.batch_sizes}
    times = rounds(variants, device, min_rounds=1, max_rounds=settings.max_rounds, budget_s=settings.budget_s)
    rows = {}
    for size, values in times.wall.items():
        seconds = statistics.median(values)
        rows[size] = {
            "seconds": round(seconds, 3),
            "answers_per_s": round(len(prompts) / seconds, 3),
            "scoring_share": round(statistics.median(scoring[size]) / seconds, 3),
            "samples": len(values),
        }
    base = rows[str(min(settings.batch_sizes))]["answers_per_s"]
    for row in rows.values():
        row["speedup_over_smallest"] = round(row["answers_per_s"] / base, 2)
    return {
        "prompts": len(prompts),
        "max_new_tokens": settings.new_tokens,
        "steering": "one set edit, all positions, every row",
        "scoring": "perplexity of every answer under the model itself (eval's default reference), same batch size",
        "by_batch_size": rows,
    }
