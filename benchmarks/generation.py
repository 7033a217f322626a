"""Generation against the physical limit: nsteer steered and unsteered beside plain Hugging Face ``generate`` on the
unwrapped model, with and without one forward hook making the same edit.

Four variants per batch size, same left-padded input ids, greedy, ``min_new_tokens = max_new_tokens``:

- ``hf_plain``: ``generate`` on the unwrapped twin (no nnsight anywhere): the physical limit;
- ``hf_hook``: the same, with a forward hook making the ``set`` edit nsteer makes: the cheapest way to steer;
- ``nsteer_steered``: nsteer's traced generation with that edit (what ``nsteer generate`` runs);
- ``nsteer_unsteered``: nsteer's traced generation with no edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.fixtures import BenchModel, HookEdits, edit_layers, generation_inputs, set_edits
from benchmarks.harness import rounds

VARIANTS = ("hf_plain", "hf_hook", "nsteer_steered", "nsteer_unsteered")


@dataclass(frozen=True)
class GenerationSettings:
    """Sizes and repeats of the generation section."""

    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    min_rounds: int = 4
    max_rounds: int = 12
    budgets_s: tuple[float, ...] = (150.0, 200.0)  # per batch size: more rounds only while inside it


def bench_generation(
    model: BenchModel,
    settings: GenerationSettings,
    device: str,
    vector: tuple[torch.Tensor, torch.Tensor],
    targets: dict[str, float],
) -> dict[str, Any]:
    """Every variant at every batch size; ratios against the unwrapped model and against the hook."""
    from nsteer.edits import compile_plan
    from nsteer.generate import GenerationConfig, steered_generate_batches

    handle, plain_model = model.handle, model.plain
    steps = settings.new_tokens
    config = GenerationConfig(max_new_tokens=steps)
    kwargs = {**config.generate_kwargs(handle.tokenizer.pad_token_id), "min_new_tokens": steps}
    warm = {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
    edits = set_edits(vector, edit_layers(handle.n_layers, 1))
    results: dict[str, Any] = {}
    for batch_size, budget_s in zip(settings.batch_sizes, settings.budgets_s):
        input_ids, attention_mask = generation_inputs(handle, batch_size, device)
        plan = compile_plan([edits] * batch_size)
        tokens: dict[str, torch.Tensor] = {}

        def make(name: str, *, ids=input_ids, mask=attention_mask, plan=plan, tokens=tokens) -> Callable[..., None]:
            def run(generate_kwargs: dict = kwargs) -> None:
                if name.startswith("hf_"):
                    with (
                        torch.inference_mode(),
                        HookEdits(plain_model, handle.layers_path, edits if name == "hf_hook" else []),
                    ):
                        output = plain_model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
                else:
                    chosen = plan if name == "nsteer_steered" else ()
                    output = steered_generate_batches(handle, [(ids, mask, chosen)], generate_kwargs)[0]
                tokens[name] = output

            return run

        variants = {name: make(name) for name in VARIANTS}
        for variant in variants.values():  # warm-up: nnsight compiles its trace bodies, buffers get allocated
            variant(warm)
        times = rounds(
            variants, device, min_rounds=settings.min_rounds, max_rounds=settings.max_rounds, budget_s=budget_s
        )
        same = {name: tokens[name].cpu() for name in VARIANTS}
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "prompt_width": int(input_ids.shape[1]),
            "new_tokens": steps,
            "edit": f"one set edit, all positions, layer {edits[0].layer}",
            "rounds": len(times.wall[VARIANTS[0]]),
            **times.rounded(),
            "steered_over_plain": times.compare("nsteer_steered", "hf_plain", targets.get("steered_over_plain")),
            "nsteer_over_hook": times.compare("nsteer_steered", "hf_hook", targets.get("nsteer_over_hook")),
            "unsteered_over_plain": times.compare("nsteer_unsteered", "hf_plain"),
            "hook_over_plain": times.compare("hf_hook", "hf_plain"),
            "per_step_ms": times.per_step_ms(steps),
            "per_step_cpu_ms": times.per_step_ms(steps, cpu=True),
            "steered_matches_hook": bool(torch.equal(same["nsteer_steered"], same["hf_hook"])),
            "unsteered_matches_plain": bool(torch.equal(same["nsteer_unsteered"], same["hf_plain"])),
        }
    return results
