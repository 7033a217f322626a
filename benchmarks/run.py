"""nsteer benchmarks: what steering, extraction and evaluation cost next to the plain work they do.

Every comparison is measured side by side in one process: the variants of a pair run alternately (A B, then B A, ...)
for several rounds and the headline ratio is the median of the per-round ratios (each round's A over the same
round's B), which cancels most of the drift of a shared machine's load. Medians of each side, minima, and the spread of
the per-round ratios go into the JSON so the noise can be judged.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run.py               # full run (make bench), embedded model
    .venv/bin/python benchmarks/run.py --quick --model tiny --out x.json  # smoke run on a tiny random model

Pairs measured (see docs/performance.md for the results and how to read them):

- steered / unsteered generation: nsteer ``steered_generate_batches`` (one batch) with one ``set`` edit at every
  position over plain ``transformers`` ``generate``, same left-padded input ids, greedy,
  ``min_new_tokens = max_new_tokens``.
- nsteer edit path / plain forward hook: the same steered generation through nsteer and through HF ``generate`` with a
  ``register_forward_hook`` that makes the same edit.
- per-step overhead: CPU ms per decoding step that nsteer's step loop, a forward hook, and 1 / 2 / 4 composed edits
  add to HF ``generate`` on a deep, narrow random model (little compute per step, so fixed costs show), and what that
  fixed cost means at the benchmark model's own per-step time.
- extraction / bare forward: ``last_token_sums`` (exactly what ``compute_vector`` runs per batch) plus tokenization
  over the same batches as a bare forward pass of the decoder stack, batch by batch alternately.
- memory: peak resident memory of ``compute_vector`` over N and 8N pairs, each in a fresh subprocess.
- evaluation throughput: answers per second of ``nsteer.generate.generate`` (the function ``nsteer eval`` calls) per
  batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGETS = {
    "steered_over_unsteered": 1.10,
    "nsteer_over_hook": 1.05,
    "extraction_over_forward": 1.20,
    "memory_large_over_small": 1.10,
}
INSTRUCTION = "lowercase"
SECTIONS = ("extraction", "generation", "overhead", "eval", "memory")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one benchmark run."""

    new_tokens: int = 64
    generation_batches: tuple[int, ...] = (1, 8)
    min_rounds: int = 3
    max_rounds: int = 9
    # Seconds per generation batch size (same order as generation_batches): rounds beyond min_rounds only while the
    # batch size's measurement is inside its budget.
    generation_budgets_s: tuple[float, ...] = (100.0, 140.0)
    # Per-step overhead: a deep, narrow random model (little compute per step, so fixed per-step costs show), with
    # 0 / 1 / 2 / 4 composed edits; CPU time per decoding step, many short rounds.
    overhead_layers: int = 30
    edit_counts: tuple[int, ...] = (1, 2, 4)
    overhead_rounds: int = 10
    extraction_pairs: int = 256
    extraction_batch_size: int = 16
    full_forward_every: int = 16  # also time the full CausalLM forward (with LM head) on every k-th batch
    research_prompts: int = 16  # one-at-a-time output_hidden_states reads, timed on this many prompts and scaled
    memory_pairs: tuple[int, int] = (256, 2048)
    memory_layers: int = 2  # the memory model: the benchmark model's width and tokenizer, this many random layers
    eval_prompts: int = 16
    eval_new_tokens: int = 24
    eval_batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    eval_max_rounds: int = 2
    eval_budget_s: float = 60.0


FULL = Settings()
QUICK = Settings(
    new_tokens=8,
    min_rounds=2,
    max_rounds=2,
    generation_budgets_s=(5.0, 5.0),
    overhead_layers=4,
    overhead_rounds=2,
    extraction_pairs=16,
    full_forward_every=2,
    research_prompts=4,
    memory_pairs=(8, 64),
    eval_prompts=16,
    eval_new_tokens=4,
    eval_max_rounds=1,
    eval_budget_s=5.0,
)


# ----------------------------------------------------------------------------------------------------------- machine


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class LoadLog:
    """Load averages and start times sampled at the start of every section."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, list[float], float]] = []

    def mark(self, section: str) -> None:
        """Record the load average and the time now, labelled with the section about to run."""
        self.samples.append((section, load_average(), time.perf_counter()))

    def summary(self) -> dict[str, Any]:
        """Every sample (with the section's duration) plus min / max of the 1-minute figure."""
        ones = [load[0] for _, load, _ in self.samples if load]
        ends = [start for _, _, start in self.samples[1:]] + [self.samples[-1][2]]
        return {
            "samples": [
                {"section": name, "load": load, "seconds": round(end - start, 1)}
                for (name, load, start), end in zip(self.samples, ends)
            ],
            "one_minute_min": min(ones) if ones else None,
            "one_minute_max": max(ones) if ones else None,
        }


# ---------------------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall times are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of one call."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


@dataclass
class Timings:
    """Wall and CPU seconds per variant, one entry per round."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def compare(self, numerator: str, denominator: str, target: float | None = None) -> dict[str, Any]:
        """``compare`` of two variants, with the CPU-time ratio beside the wall-time one."""
        return compare(self.wall[numerator], self.wall[denominator], target, self.cpu[numerator], self.cpu[denominator])


def alternate(
    variants: dict[str, Callable[[], Any]], device: str, *, min_rounds: int, max_rounds: int, budget_s: float
) -> Timings:
    """Run every variant once per round, in forward then reverse order; keep going while the budget allows."""
    names = list(variants)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    started = time.perf_counter()
    for index in range(max_rounds):
        elapsed = time.perf_counter() - started
        if index >= min_rounds and elapsed + elapsed / index > budget_s:
            break
        for name in names if index % 2 == 0 else names[::-1]:
            wall, cpu = timed(variants[name], device)
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings


def compare(
    numerator: Sequence[float],
    denominator: Sequence[float],
    target: float | None = None,
    numerator_cpu: Sequence[float] | None = None,
    denominator_cpu: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Ratio statistics of paired samples: the median of per-pair ratios (headline), of medians and of minima.

    With CPU times, ``cpu_ratio`` is the median of per-pair CPU-time ratios: with one torch thread it counts only the
    time this process ran, so it is far less sensitive to other processes' load than wall time.
    """
    paired = [a / b for a, b in zip(numerator, denominator)]
    result: dict[str, Any] = {
        "ratio": round(statistics.median(paired), 4),
        "ratio_of_medians": round(statistics.median(numerator) / statistics.median(denominator), 4),
        "ratio_of_minima": round(min(numerator) / min(denominator), 4),
        "paired_min": round(min(paired), 4),
        "paired_max": round(max(paired), 4),
        "samples": len(paired),
        "a_median_s": round(statistics.median(numerator), 4),
        "b_median_s": round(statistics.median(denominator), 4),
    }
    if numerator_cpu and denominator_cpu:
        result["cpu_ratio"] = round(statistics.median(a / b for a, b in zip(numerator_cpu, denominator_cpu)), 4)
        result["cpu_a_median_s"] = round(statistics.median(numerator_cpu), 4)
        result["cpu_b_median_s"] = round(statistics.median(denominator_cpu), 4)
    if target is not None:
        result["target"] = target
        result["met"] = result["ratio"] <= target
    return result


# ---------------------------------------------------------------------------------------------------------- models


def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer with a ChatML template, trained in memory on the built-in prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nsteer.prompts import builtin_instruction, load_base_prompts

    corpus = [p.text for p in load_base_prompts("builtin:base-v1")] + list(builtin_instruction(INSTRUCTION).phrasings)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def random_model(config: Any, device: str, seed: int = 0) -> Any:
    """A randomly initialised causal LM from ``config`` (timing and memory do not depend on the weights' values)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def tiny_config(tokenizer: Any, layers: int = 4) -> Any:
    """A width-64 Llama config (4 layers by default) for the tiny benchmark model."""
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=eos,
        initializer_range=0.1,
    )


def open_benchmark_model(kind: str, device: str) -> Any:
    """``embedded``: the embedded SmolLM2 model; ``tiny``: a tiny random Llama with an in-memory tokenizer."""
    from nsteer.constants import EMBEDDED_ID
    from nsteer.models import open_model, wrap_model

    if kind == "embedded":
        return open_model(EMBEDDED_ID, device=device)
    tokenizer = tiny_tokenizer()
    return wrap_model(random_model(tiny_config(tokenizer), device), tokenizer, model_id="bench-tiny")


# ---------------------------------------------------------------------------------------------------------- inputs


def benchmark_pairs(count: int) -> list[Any]:
    """``count`` pairs of the built-in base prompts with the lowercase phrasings (cycled when count > prompts)."""
    from nsteer.prompts import builtin_instruction, load_base_prompts, make_pairs

    base = load_base_prompts("builtin:base-v1")
    pairs = list(make_pairs(base[: min(count, len(base))], builtin_instruction(INSTRUCTION).phrasings, seed=0))
    return [pairs[index % len(pairs)] for index in range(count)]


def generation_inputs(handle: Any, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` base prompts, chat-templated and left-padded exactly as nsteer does it."""
    from nsteer.extract import chat_token_ids, left_pad
    from nsteer.prompts import load_base_prompts

    prompts = [p.text for p in load_base_prompts("builtin:base-v1")[:batch_size]]
    input_ids, attention_mask = left_pad(
        [chat_token_ids(handle.tokenizer, p) for p in prompts], handle.tokenizer.pad_token_id
    )
    return input_ids.to(device), attention_mask.to(device)


def edit_layers(n_layers: int, count: int) -> list[int]:
    """``count`` distinct layers spread evenly over the model's depth (one edit: the middle layer)."""
    return [min(n_layers - 1, (n_layers * (index + 1)) // (count + 1)) for index in range(count)]


def make_edits(vector_stats: tuple[torch.Tensor, torch.Tensor], layers: Sequence[int]) -> list[Any]:
    """``set`` edits (weight 1, all positions) with the benchmark's direction at each of ``layers``."""
    from nsteer.edits import Edit

    directions, mean_projections = vector_stats
    return [
        Edit(layer=layer, direction=directions[layer], mode="set", weight=1.0, target=float(mean_projections[layer]))
        for layer in layers
    ]


class HookEdits:
    """The same ``set`` edits as plain PyTorch forward hooks on the decoder blocks (the baseline edit path)."""

    def __init__(self, handle: Any, edits: Sequence[Any]) -> None:
        from nsteer.models import resolve_path

        self.blocks = resolve_path(handle.hf_model, handle.layers_path)
        self.edits = edits
        self.device = handle.device
        self.dtype = handle.dtype
        self.handles: list[Any] = []

    @staticmethod
    def _hook(unit: torch.Tensor, target: float, weight: float) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            projection = (hidden * unit).sum(dim=-1, keepdim=True)
            edited = hidden + weight * (target - projection) * unit
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def __enter__(self) -> HookEdits:
        for edit in self.edits:
            unit = edit.direction.to(self.device, self.dtype)
            self.handles.append(
                self.blocks[edit.layer].register_forward_hook(self._hook(unit, edit.target, edit.weight))
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ------------------------------------------------------------------------------------------------------- sections


def quick_vector(handle: Any, pairs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and mean projections from a few pairs (when the extraction section is skipped)."""
    from nsteer.extract import direction_statistics, mean_difference

    directions, mean_projections, _ = direction_statistics(mean_difference(handle, benchmark_pairs(pairs)))
    return directions, mean_projections


def bench_extraction(
    handle: Any, settings: Settings, device: str
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Extraction (last_token_sums per batch + tokenization) vs a bare decoder forward on the same batches."""
    from nsteer.extract import MeanDifference, direction_statistics, extraction_batches, last_token_sums

    pairs = benchmark_pairs(settings.extraction_pairs)
    hf_model = handle.hf_model
    decoder = hf_model.base_model

    start = time.perf_counter()
    batches = extraction_batches(handle, pairs, batch_size=settings.extraction_batch_size)
    tokenize_s = time.perf_counter() - start
    batches = [(ids.to(device), mask.to(device), n_with) for ids, mask, n_with in batches]

    def forward_decoder(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.inference_mode():
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def forward_full(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.inference_mode():
            hf_model(input_ids=ids, attention_mask=mask, use_cache=False)

    # Warm-up: nnsight compiles the trace body once per process; the first forward allocates its buffers.
    last_token_sums(handle, batches[:1])
    forward_decoder(*batches[0][:2])
    forward_full(*batches[0][:2])

    sums = torch.zeros(2, handle.n_layers, handle.hidden_size, dtype=torch.float64)
    nsteer_times, decoder_times, nsteer_cpu, decoder_cpu, full_pairs = [], [], [], [], []
    for index, batch in enumerate(batches):
        ids, mask, _ = batch
        collected: list[torch.Tensor] = []
        variants = {
            "nsteer": lambda collected=collected, batch=batch: collected.append(last_token_sums(handle, [batch])),
            "decoder": lambda ids=ids, mask=mask: forward_decoder(ids, mask),
        }
        times = alternate(
            variants if index % 2 == 0 else dict(reversed(variants.items())),
            device,
            min_rounds=1,
            max_rounds=1,
            budget_s=0,
        )
        sums += collected[0].to(torch.float64).cpu()
        nsteer_times.append(times.wall["nsteer"][0])
        decoder_times.append(times.wall["decoder"][0])
        nsteer_cpu.append(times.cpu["nsteer"][0])
        decoder_cpu.append(times.cpu["decoder"][0])
        if settings.full_forward_every and index % settings.full_forward_every == 0:
            full_pairs.append(
                (times.wall["nsteer"][0], timed(lambda ids=ids, mask=mask: forward_full(ids, mask), device)[0])
            )

    # Per-batch paired ratios; the total adds tokenization (batching included) to nsteer's side.
    per_batch = compare(nsteer_times, decoder_times, None, nsteer_cpu, decoder_cpu)
    total_nsteer = sum(nsteer_times) + tokenize_s
    total_decoder = sum(decoder_times)
    statistics_ = MeanDifference(sums[0] / len(pairs), sums[1] / len(pairs), len(pairs))
    directions, mean_projections, _ = direction_statistics(statistics_)

    # The research-code way: one prompt at a time, all hidden states returned, every last-token state kept.
    from nsteer.extract import chat_token_ids

    texts = [text for pair in pairs for text in (pair.with_instruction, pair.without_instruction)]
    subset = texts[: settings.research_prompts]
    encoded = [torch.tensor([chat_token_ids(handle.tokenizer, text)], device=device) for text in subset]
    with torch.inference_mode():
        hf_model(input_ids=encoded[0], output_hidden_states=True)  # warm-up

        def research() -> None:
            kept = []
            for ids in encoded:
                output = hf_model(input_ids=ids, output_hidden_states=True)
                kept.append(torch.stack([h[0, -1] for h in output.hidden_states[1:]]).cpu())
            torch.stack(kept).mean(dim=0)

        research_s = timed(research, device)[0]
    research_scaled = research_s * len(texts) / len(subset)

    result = {
        "pairs": len(pairs),
        "prompts": len(texts),
        "batch_size": settings.extraction_batch_size,
        "batches": len(batches),
        "tokenize_s": round(tokenize_s, 4),
        "nsteer_total_s": round(total_nsteer, 3),
        "decoder_forward_total_s": round(total_decoder, 3),
        "ratio_totals": round(total_nsteer / total_decoder, 4),
        "per_batch": per_batch,
        "ratio": per_batch["ratio"],
        "target": TARGETS["extraction_over_forward"],
        "met": per_batch["ratio"] <= TARGETS["extraction_over_forward"]
        and total_nsteer / total_decoder <= TARGETS["extraction_over_forward"],
        "full_forward_subset": compare([a for a, _ in full_pairs], [b for _, b in full_pairs]) if full_pairs else None,
        "research_subset_prompts": len(subset),
        "research_subset_s": round(research_s, 4),
        "research_scaled_s": round(research_scaled, 3),
        "speedup_over_research": round(research_scaled / total_nsteer, 2),
        "note": (
            f"research-code time measured on {len(subset)} prompts and scaled x{len(texts) / len(subset):g}; "
            "decoder forward = the model's base module (embeddings, blocks, final norm), no LM head, no reads"
        ),
    }
    return result, (directions, mean_projections)


def bench_generation(
    handle: Any, settings: Settings, device: str, vector_stats: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Steered (nsteer) vs unsteered (HF generate) vs forward-hook steering, per batch size."""
    from nsteer.edits import compile_plan
    from nsteer.generate import GenerationConfig, steered_generate_batches

    hf_model = handle.hf_model
    config = GenerationConfig(max_new_tokens=settings.new_tokens)
    kwargs = {**config.generate_kwargs(handle.tokenizer.pad_token_id), "min_new_tokens": settings.new_tokens}
    warm_kwargs = {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
    results: dict[str, Any] = {}
    one_edit = make_edits(vector_stats, edit_layers(handle.n_layers, 1))
    for batch_size, budget_s in zip(settings.generation_batches, settings.generation_budgets_s):
        input_ids, attention_mask = generation_inputs(handle, batch_size, device)
        plan = compile_plan([one_edit] * batch_size)
        outputs: dict[str, torch.Tensor] = {}

        # The loop's inputs, plan and outputs are bound as keyword defaults: the variants run within this iteration.
        def plain(
            store: str | None = None,
            generate_kwargs: dict = kwargs,
            *,
            input_ids: torch.Tensor = input_ids,
            attention_mask: torch.Tensor = attention_mask,
            outputs: dict[str, torch.Tensor] = outputs,
        ) -> None:
            with torch.inference_mode():
                tokens = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
            if store:
                outputs[store] = tokens.cpu()

        def hooked(store: str | None = None, generate_kwargs: dict = kwargs) -> None:
            with HookEdits(handle, one_edit):
                plain(store, generate_kwargs)

        def steered(
            store: str | None = None,
            generate_kwargs: dict = kwargs,
            *,
            input_ids: torch.Tensor = input_ids,
            attention_mask: torch.Tensor = attention_mask,
            plan: Any = plan,
            outputs: dict[str, torch.Tensor] = outputs,
        ) -> None:
            tokens = steered_generate_batches(handle, [(input_ids, attention_mask, plan)], generate_kwargs)[0]
            if store:
                outputs[store] = tokens.cpu()

        variants: dict[str, Callable[[], Any]] = {
            "hf_unsteered": plain,
            "nsteer_steered": steered,
            "hook_steered": hooked,
        }
        # Warm-up (2 tokens): compiles nnsight's trace bodies and allocates buffers; also the correctness check.
        plain("hf_unsteered", warm_kwargs)
        hooked("hook", warm_kwargs)
        steered("nsteer", warm_kwargs)
        times = alternate(
            variants, device, min_rounds=settings.min_rounds, max_rounds=settings.max_rounds, budget_s=budget_s
        )
        steps = settings.new_tokens
        entry: dict[str, Any] = {
            "batch_size": batch_size,
            "prompt_width": int(input_ids.shape[1]),
            "new_tokens": steps,
            "times_s": {name: [round(t, 4) for t in values] for name, values in times.wall.items()},
            "cpu_times_s": {name: [round(t, 4) for t in values] for name, values in times.cpu.items()},
            "steered_over_unsteered": times.compare(
                "nsteer_steered", "hf_unsteered", TARGETS["steered_over_unsteered"]
            ),
            "nsteer_over_hook": times.compare("nsteer_steered", "hook_steered", TARGETS["nsteer_over_hook"]),
            "hook_over_unsteered": times.compare("hook_steered", "hf_unsteered"),
            "per_step_ms": {
                name: round(1000 * statistics.median(values) / steps, 2) for name, values in times.wall.items()
            },
            "per_step_cpu_ms": {
                name: round(1000 * statistics.median(values) / steps, 2) for name, values in times.cpu.items()
            },
            "nsteer_edit_matches_hook": bool(torch.equal(outputs["nsteer"], outputs["hook"])),
        }
        results[f"batch_{batch_size}"] = entry
    return results


def bench_overhead(settings: Settings, device: str, generation: dict[str, Any] | None) -> dict[str, Any]:
    """Fixed per-step cost of the nsteer edit path, and of each composed edit, where compute hides nothing.

    A deep, narrow random model spends little time computing per step, so what nnsight's step loop and each edit
    add per decoding step stands out; CPU time per step (one torch thread) is robust to other processes. Against
    the benchmark model's own per-step time (the generation section) this gives the expected overhead there.
    """
    from nsteer.edits import compile_plan
    from nsteer.generate import GenerationConfig, steered_generate_batches
    from nsteer.models import wrap_model

    tokenizer = tiny_tokenizer()
    handle = wrap_model(
        random_model(tiny_config(tokenizer, settings.overhead_layers), device), tokenizer, model_id="bench-deep-narrow"
    )
    vector_stats = quick_vector(handle)
    input_ids, attention_mask = generation_inputs(handle, 1, device)
    steps = settings.new_tokens
    kwargs = {**GenerationConfig(max_new_tokens=steps).generate_kwargs(tokenizer.pad_token_id), "min_new_tokens": steps}
    counts = tuple(sorted({0, 1, *settings.edit_counts}))  # 0 and 1 are the references the costs are read from
    edit_sets = {count: make_edits(vector_stats, edit_layers(handle.n_layers, count)) for count in counts}
    plans = {count: compile_plan([edits]) for count, edits in edit_sets.items()}

    def plain() -> None:
        with torch.inference_mode():
            handle.hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def hooked() -> None:
        with HookEdits(handle, edit_sets[1]):
            plain()

    variants: dict[str, Callable[[], Any]] = {"hf_unsteered": plain, "hook_edits_1": hooked}
    for count in counts:
        variants[f"nsteer_edits_{count}"] = lambda count=count: steered_generate_batches(
            handle, [(input_ids, attention_mask, plans[count])], kwargs
        )[0]
    for variant in variants.values():  # warm-up
        variant()
    times = alternate(
        variants, device, min_rounds=settings.overhead_rounds, max_rounds=settings.overhead_rounds, budget_s=0.0
    )
    per_step = {name: 1000 * statistics.median(values) / steps for name, values in times.cpu.items()}
    base = per_step["hf_unsteered"]
    extra = {name: round(value - base, 3) for name, value in per_step.items()}
    slope = (
        statistics.median(
            (per_step[f"nsteer_edits_{count}"] - per_step["nsteer_edits_1"]) / (count - 1)
            for count in counts
            if count > 1
        )
        if counts[-1] > 1
        else float("nan")
    )
    result: dict[str, Any] = {
        "model": f"random Llama, width 64, {settings.overhead_layers} layers",
        "batch_size": 1,
        "new_tokens": steps,
        "rounds": settings.overhead_rounds,
        "cpu_ms_per_step": {name: round(value, 3) for name, value in per_step.items()},
        "extra_ms_per_step_over_hf": extra,
        "nsteer_minus_hook_ms_per_step": round(per_step["nsteer_edits_1"] - per_step["hook_edits_1"], 3),
        "ms_per_additional_edit": round(slope, 3),
        "composed_edits": {
            str(count): {
                "layers": edit_layers(handle.n_layers, count),
                **times.compare(f"nsteer_edits_{count}", "hf_unsteered"),
            }
            for count in counts
        },
    }
    # What this fixed cost is worth on the benchmark model: its measured per-step CPU time, plus the extra ms.
    for key, entry in (generation or {}).items():
        step_ms = entry["per_step_cpu_ms"]["hf_unsteered"]
        result[f"expected_nsteer_over_hf_{key}"] = round((step_ms + extra["nsteer_edits_1"]) / step_ms, 4)
        result[f"expected_nsteer_over_hook_{key}"] = round(
            (step_ms + extra["nsteer_edits_1"]) / (step_ms + extra["hook_edits_1"]), 4
        )
    return result


def bench_eval_throughput(
    handle: Any, settings: Settings, device: str, vector_stats: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Answers per second of ``nsteer.generate.generate`` (steered, EOS-stopped as in eval) per batch size."""
    from nsteer.generate import GenerationConfig, generate
    from nsteer.prompts import load_base_prompts

    prompts = [p.text for p in load_base_prompts("builtin:base-v1")[: settings.eval_prompts]]
    edits = make_edits(vector_stats, edit_layers(handle.n_layers, 1))
    generate(handle, prompts[:2], edits, config=GenerationConfig(max_new_tokens=2, batch_size=2))  # warm-up
    variants = {
        str(size): (
            lambda size=size: generate(
                handle,
                prompts,
                edits,
                config=GenerationConfig(max_new_tokens=settings.eval_new_tokens, batch_size=size),
            )
        )
        for size in settings.eval_batch_sizes
    }
    times = alternate(
        variants, device, min_rounds=1, max_rounds=settings.eval_max_rounds, budget_s=settings.eval_budget_s
    )
    rows = {}
    for size, values in times.wall.items():
        best = statistics.median(values)
        rows[size] = {"seconds": round(best, 3), "answers_per_s": round(len(prompts) / best, 3), "samples": len(values)}
    base = rows[str(min(settings.eval_batch_sizes))]["answers_per_s"]
    for row in rows.values():
        row["speedup_over_smallest"] = round(row["answers_per_s"] / base, 2)
    return {
        "prompts": len(prompts),
        "max_new_tokens": settings.eval_new_tokens,
        "steering": (
            "one set edit, all positions, every row (eval's steered and unsteered cells run in the same traced loop)"
        ),
        "by_batch_size": rows,
    }


# ----------------------------------------------------------------------------------------------------------- memory


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The kernel's resident high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    """Polls RSS every few milliseconds (a fallback and cross-check for VmHWM)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)


def torch_allocation_peak(function: Callable[[], Any]) -> tuple[int, int]:
    """Run ``function`` under the profiler; return (peak, final) live torch-allocated CPU bytes relative to the start.

    The running sum of the profiler's allocation events (frees are negative) is the memory torch's CPU allocator
    handed out, independent of how glibc caches and returns pages; its maximum is the peak of the run.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live


def memory_child(args: argparse.Namespace) -> None:
    """(Subprocess) compute one vector over ``--pairs`` pairs and print peak-memory figures as JSON."""
    from nsteer.extract import compute_vector
    from nsteer.models import wrap_model
    from nsteer.prompts import builtin_instruction

    torch.set_num_threads(args.threads)
    device = args.device
    if args.memory_model == "tiny":
        tokenizer = tiny_tokenizer()
        config = tiny_config(tokenizer)
    else:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.memory_dir)
        config = AutoConfig.from_pretrained(args.memory_dir)
        config.num_hidden_layers = args.memory_layers
    handle = wrap_model(random_model(config, device), tokenizer, model_id=f"bench-memory-{args.memory_model}")
    base = benchmark_pairs(args.memory_base)
    pairs = [base[index % len(base)] for index in range(args.pairs)]
    instruction = builtin_instruction(INSTRUCTION)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = current_rss()
    reset_ok = reset_peak_rss()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    torch_peak, torch_final = torch_allocation_peak(
        lambda: compute_vector(handle, instruction, pairs, batch_size=args.batch_size)
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    peak = max(peak_rss() if reset_ok else 0, sampler.peak)
    report = {
        "pairs": len(pairs),
        "seconds_with_profiler": round(seconds, 3),
        "torch_peak_mb": round(torch_peak / 2**20, 2),
        "torch_retained_mb": round(torch_final / 2**20, 2),
        # Resident memory of the whole process, the profiler's own event buffers included (they grow with the number
        # of batches): recorded for completeness, not a measure of extraction.
        "rss_before_mb": round(rss_before / 2**20, 2),
        "process_peak_rss_mb_profiler_included": round(peak / 2**20, 2),
        "rss_peak_source": "VmHWM reset via /proc/self/clear_refs" if reset_ok else "RSS sampled every 2 ms",
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
    }
    if device.startswith("cuda"):
        report["cuda_peak_delta_mb"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 2)
    print("MEMORY_JSON " + json.dumps(report), flush=True)


def bench_memory(handle: Any, settings: Settings, device: str, threads: int, model_kind: str) -> dict[str, Any]:
    """Peak memory of extraction over the small and the large pair count, each in a fresh subprocess."""
    small, large = settings.memory_pairs
    with tempfile.TemporaryDirectory(prefix="nsteer-bench-") as directory:
        memory_model = "tiny" if model_kind == "tiny" else "shallow"
        if memory_model == "shallow":  # the benchmark model's tokenizer and config, saved so children load them fast
            handle.tokenizer.save_pretrained(directory)
            handle.hf_model.config.save_pretrained(directory)
        runs = {}
        for pairs in (small, large):
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                "--pairs",
                str(pairs),
                "--memory-base",
                str(small),
                "--memory-model",
                memory_model,
                "--memory-dir",
                directory,
                "--memory-layers",
                str(settings.memory_layers),
                "--device",
                device,
                "--threads",
                str(threads),
                "--batch-size",
                str(settings.extraction_batch_size),
            ]
            completed = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            line = next((out for out in completed.stdout.splitlines() if out.startswith("MEMORY_JSON ")), None)
            if completed.returncode != 0 or line is None:
                raise RuntimeError(
                    f"memory subprocess for {pairs} pairs failed:\n{completed.stdout[-2000:]}\n"
                    f"{completed.stderr[-4000:]}"
                )
            runs[str(pairs)] = json.loads(line[len("MEMORY_JSON ") :])
    key = "cuda_peak_delta_mb" if device.startswith("cuda") else "torch_peak_mb"
    ratio = runs[str(large)][key] / max(runs[str(small)][key], 1e-9)
    described = (
        f"{handle.hidden_size}-wide random model with {settings.memory_layers} layers "
        "and the benchmark model's tokenizer"
        if memory_model == "shallow"
        else "the tiny benchmark model"
    )
    return {
        "model": described,
        "pair_counts": [small, large],
        "large_set": (
            f"the {small} pairs repeated x{large // small}: same prompt-length distribution, only the count differs"
        ),
        "runs": runs,
        "measure": key,
        "ratio": round(ratio, 4),
        "measure_note": (
            "peak of live torch-allocated bytes during compute_vector, from the profiler's allocation events, in a "
            "fresh process per pair count; RSS is not the headline because glibc's caching made RSS deltas vary by "
            "+-40% between identical runs, and the profiler's own buffers inflate RSS with the event count"
        ),
        "target": TARGETS["memory_large_over_small"],
        "met": abs(ratio - 1.0) <= TARGETS["memory_large_over_small"] - 1.0,
    }


# ------------------------------------------------------------------------------------------------------------ report


def format_table(report: dict[str, Any]) -> str:
    """The printed table: one line per ratio, then composed edits and evaluation throughput."""
    meta = report["meta"]
    lines = [
        f"nsteer benchmarks: {meta['device']} | {meta['model']} | {meta['cpu_model']} x{meta['nproc']} | "
        f"torch {meta['torch']} ({meta['torch_threads']} thread(s)) | load {meta['load_start']} -> {meta['load_end']}"
        f" | {meta['wall_s']:.0f} s",
        f"{'ratio (A / B)':<52}{'A med s':>9}{'B med s':>9}{'ratio':>8}{'spread':>16}{'cpu':>7}{'target':>8}  met",
    ]

    def row(name: str, stats: dict[str, Any]) -> None:
        spread = f"{stats.get('paired_min', stats['ratio']):.3f}-{stats.get('paired_max', stats['ratio']):.3f}"
        target = stats.get("target")
        cpu = f"{stats['cpu_ratio']:.3f}" if "cpu_ratio" in stats else "-"
        lines.append(
            f"{name:<52}{stats.get('a_median_s', float('nan')):>9.3f}{stats.get('b_median_s', float('nan')):>9.3f}"
            f"{stats['ratio']:>8.3f}{spread:>16}{cpu:>7}"
            f"{(f'{target:.2f}' if target else '-'):>8}  "
            f"{'-' if target is None else ('yes' if stats.get('met') else 'NO')}"
        )

    for _key, entry in (report["generation"] or {}).items():
        size = entry["batch_size"]
        row(f"steered / unsteered generation, batch {size}", entry["steered_over_unsteered"])
        row(f"nsteer edit / forward hook, batch {size}", entry["nsteer_over_hook"])
        row(f"  (hook / unsteered, batch {size})", entry["hook_over_unsteered"])
    extraction = report["extraction"]
    if extraction:
        per_batch = dict(extraction["per_batch"], target=extraction["target"], met=extraction["met"])
        row(f"extraction / bare forward, {extraction['pairs']} pairs (per batch)", per_batch)
        lines.append(
            f"{'  (totals, tokenization included)':<52}{extraction['nsteer_total_s']:>9.2f}"
            f"{extraction['decoder_forward_total_s']:>9.2f}{extraction['ratio_totals']:>8.3f}"
        )
        if extraction.get("full_forward_subset"):
            row("  (extraction / full forward with LM head, subset)", extraction["full_forward_subset"])
    memory = report["memory"]
    if memory:
        small, large = memory["pair_counts"]
        measure = memory["measure"]
        lines.append(
            f"{f'memory peak, {large} / {small} pairs':<52}{memory['runs'][str(large)][measure]:>8.1f}M"
            f"{memory['runs'][str(small)][measure]:>8.1f}M{memory['ratio']:>8.3f}{'':>16}{'':>7}"
            f"{memory['target']:>8.2f}  {'yes' if memory['met'] else 'NO'}"
        )
        lines.append(f"  memory: {measure}; {memory['model']}; {memory['large_set']}")
    if extraction:
        lines.append(
            "speed-up of extraction over one-prompt-at-a-time output_hidden_states: "
            f"x{extraction['speedup_over_research']}"
            f" ({extraction['note'].split(';')[0]})"
        )
    overhead = report.get("overhead")
    if overhead:
        extra = overhead["extra_ms_per_step_over_hf"]
        lines.append(
            f"per-step overhead ({overhead['model']}, batch 1, CPU ms/step over HF generate's "
            f"{overhead['cpu_ms_per_step']['hf_unsteered']:.2f}): hook {extra['hook_edits_1']:+.3f}, "
            + ", ".join(
                f"nsteer {count} edit(s) {extra[f'nsteer_edits_{count}']:+.3f}" for count in overhead["composed_edits"]
            )
            + f"; nsteer - hook {overhead['nsteer_minus_hook_ms_per_step']:+.3f} ms, "
            f"each added edit {overhead['ms_per_additional_edit']:+.3f} ms"
        )
        parts = ", ".join(
            f"{count} edit(s) {stats['cpu_ratio']:.3f}" for count, stats in overhead["composed_edits"].items()
        )
        lines.append(f"composed edits / unsteered generation (deep narrow model, CPU time): {parts}")
        for key in report["generation"] or {}:
            if f"expected_nsteer_over_hook_{key}" in overhead:
                lines.append(
                    f"  that overhead on the benchmark model, {key.replace('_', ' ')}: nsteer / HF "
                    f"{overhead[f'expected_nsteer_over_hf_{key}']:.4f}, "
                    f"nsteer / hook {overhead[f'expected_nsteer_over_hook_{key}']:.4f}"
                )
    throughput = report["eval_throughput"]
    if throughput:
        parts = ", ".join(
            f"bs {size}: {row_['answers_per_s']:.2f}/s" for size, row_ in throughput["by_batch_size"].items()
        )
        lines.append(
            f"eval throughput ({throughput['prompts']} prompts, <= {throughput['max_new_tokens']} new tokens): {parts}"
        )
    return "\n".join(lines)


def run_device(args: argparse.Namespace, device: str, settings: Settings) -> dict[str, Any]:
    """Every section on one device; returns the report."""
    import nnsight
    import transformers

    threads = args.threads
    torch.set_num_threads(threads)
    loads = LoadLog()
    started = time.perf_counter()
    load_start = load_average()
    loads.mark("load model")
    load_started = time.perf_counter()
    handle = open_benchmark_model(args.model, device)
    load_s = time.perf_counter() - load_started
    print(f"[bench] {device}: model loaded in {load_s:.1f} s; load average {load_average()}", flush=True)

    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    extraction = generation = overhead = throughput = memory = None
    if "extraction" in sections:
        loads.mark("extraction")
        extraction, vector_stats = bench_extraction(handle, settings, device)
        print(f"[bench] extraction done ({extraction['ratio']:.3f}); load {load_average()}", flush=True)
    else:
        vector_stats = quick_vector(handle)
    if "generation" in sections:
        loads.mark("generation")
        generation = bench_generation(handle, settings, device, vector_stats)
        print(f"[bench] generation done; load {load_average()}", flush=True)
    if "overhead" in sections:
        loads.mark("overhead")
        overhead = bench_overhead(settings, device, generation)
        print(f"[bench] per-step overhead done; load {load_average()}", flush=True)
    if "eval" in sections:
        loads.mark("eval throughput")
        throughput = bench_eval_throughput(handle, settings, device, vector_stats)
        print(f"[bench] eval throughput done; load {load_average()}", flush=True)
    if "memory" in sections:
        loads.mark("memory")
        memory = bench_memory(handle, settings, device, threads, args.model)
    loads.mark("end")
    meta = {
        "device": device if not device.startswith("cuda") else f"{device} ({torch.cuda.get_device_name(device)})",
        "model": handle.model_id,
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
        "dtype": str(handle.dtype).replace("torch.", ""),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_start": load_start,
        "load_end": load_average(),
        "load_during": loads.summary(),
        "model_load_s": round(load_s, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "settings": dataclasses.asdict(settings),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    ratios = {}
    for entry in (generation or {}).values():
        size = entry["batch_size"]
        ratios[f"steered_over_unsteered_batch_{size}"] = entry["steered_over_unsteered"]["ratio"]
        ratios[f"nsteer_over_hook_batch_{size}"] = entry["nsteer_over_hook"]["ratio"]
    if extraction:
        ratios["extraction_over_forward"] = extraction["ratio"]
        ratios["extraction_speedup_over_research"] = extraction["speedup_over_research"]
    if memory:
        ratios["memory_large_over_small"] = memory["ratio"]
    return {
        "meta": meta,
        "ratios": ratios,
        "targets": TARGETS,
        "generation": generation,
        "overhead": overhead,
        "extraction": extraction,
        "memory": memory,
        "eval_throughput": throughput,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--memory-*`` ones are for the memory subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats: a smoke run, not a measurement"
    )
    parser.add_argument(
        "--model",
        choices=("embedded", "tiny"),
        default="embedded",
        help="embedded SmolLM2 (default) or a tiny random Llama",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, then cuda when present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("NSTEER_BENCH_THREADS", "1")),
        help="torch intra-op threads on CPU, the same for every variant (default 1; see docs/performance.md)",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-base", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--memory-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--memory-layers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks on every requested device, print the tables and write the JSON files."""
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    settings = QUICK if args.quick else FULL
    for device in devices:
        report = run_device(args, device, settings)
        name = device.split(":")[0]
        if args.out is None:
            out = ROOT / "benchmarks" / "results" / f"{name}{'-quick' if args.quick else ''}.json"
        elif len(devices) > 1:
            out = args.out.with_name(f"{args.out.stem}-{name}{args.out.suffix}")
        else:
            out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report), flush=True)
        print(f"[bench] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
