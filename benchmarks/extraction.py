"""Extraction against a bare forward pass: ``last_token_sums`` (exactly what ``compute_vector`` runs per batch) plus
tokenization, over the same batches as the unwrapped model's decoder stack (embeddings, blocks, final norm), batch by
batch in alternating order; and against the research-code way (one prompt at a time, every hidden state returned)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.fixtures import BenchModel, benchmark_pairs
from benchmarks.harness import compare, rotated, rounds, timed


@dataclass(frozen=True)
class ExtractionSettings:
    """Sizes of the extraction section."""

    pairs: int = 256
    batch_size: int = 16
    full_forward_every: int = 16  # also time the full CausalLM forward (with LM head) on every k-th batch
    research_prompts: int = 16  # one-at-a-time output_hidden_states reads, timed on this many prompts and scaled


def bench_extraction(
    model: BenchModel, settings: ExtractionSettings, device: str, target: float
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The extraction ratios, and the vector the benchmark's edits use (directions, mean projections)."""
    from nsteer.extract import (
        MeanDifference,
        chat_token_ids,
        direction_statistics,
        extraction_batches,
        last_token_sums,
    )

    handle, plain = model.handle, model.plain
    pairs = benchmark_pairs(settings.pairs)
    decoder = plain.base_model

    start = time.perf_counter()
    batches = extraction_batches(handle, pairs, batch_size=settings.batch_size)
    tokenize_s = time.perf_counter() - start
    batches = [(ids.to(device), mask.to(device), n_with) for ids, mask, n_with in batches]

    def forward(module: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.inference_mode():
            module(input_ids=ids, attention_mask=mask, use_cache=False)

    # Warm-up: nnsight compiles the trace body once per process; the first forward allocates its buffers.
    last_token_sums(handle, batches[:1])
    forward(decoder, *batches[0][:2])
    forward(plain, *batches[0][:2])

    sums = torch.zeros(2, handle.n_layers, handle.hidden_size, dtype=torch.float64)
    nsteer_wall, decoder_wall, nsteer_cpu, decoder_cpu, full_pairs = [], [], [], [], []
    for index, batch in enumerate(batches):
        ids, mask, _ = batch
        collected: list[torch.Tensor] = []
        variants = {
            "nsteer": lambda collected=collected, batch=batch: collected.append(last_token_sums(handle, [batch])),
            "decoder": lambda ids=ids, mask=mask: forward(decoder, ids, mask),
        }
        # One round per batch, in the order rotated by the batch index.
        ordered = {name: variants[name] for name in rotated(list(variants), index)}
        times = rounds(ordered, device, min_rounds=1, max_rounds=1, budget_s=0)
        sums += collected[0].to(torch.float64).cpu()
        nsteer_wall.append(times.wall["nsteer"][0])
        decoder_wall.append(times.wall["decoder"][0])
        nsteer_cpu.append(times.cpu["nsteer"][0])
        decoder_cpu.append(times.cpu["decoder"][0])
        if settings.full_forward_every and index % settings.full_forward_every == 0:
            full_pairs.append(
                (times.wall["nsteer"][0], timed(lambda ids=ids, mask=mask: forward(plain, ids, mask), device)[0])
            )

    per_batch = compare(nsteer_wall, decoder_wall, None, nsteer_cpu, decoder_cpu)
    total_nsteer = sum(nsteer_wall) + tokenize_s
    total_decoder = sum(decoder_wall)
    directions, mean_projections, _ = direction_statistics(
        MeanDifference(sums[0] / len(pairs), sums[1] / len(pairs), len(pairs))
    )

    texts = [text for pair in pairs for text in (pair.with_instruction, pair.without_instruction)]
    subset = texts[: settings.research_prompts]
    encoded = [torch.tensor([chat_token_ids(handle.tokenizer, text)], device=device) for text in subset]
    with torch.inference_mode():
        plain(input_ids=encoded[0], output_hidden_states=True)  # warm-up

        def research() -> None:
            kept = []
            for ids in encoded:
                output = plain(input_ids=ids, output_hidden_states=True)
                kept.append(torch.stack([h[0, -1] for h in output.hidden_states[1:]]).cpu())
            torch.stack(kept).mean(dim=0)

        research_s = timed(research, device)[0]
    research_scaled = research_s * len(texts) / len(subset)
    ratio = per_batch["ratio"]
    result = {
        "pairs": len(pairs),
        "prompts": len(texts),
        "batch_size": settings.batch_size,
        "batches": len(batches),
        "tokenize_s": round(tokenize_s, 4),
        "nsteer_total_s": round(total_nsteer, 3),
        "decoder_forward_total_s": round(total_decoder, 3),
        "ratio_totals": round(total_nsteer / total_decoder, 4),
        "per_batch": per_batch,
        "ratio": ratio,
        "target": target,
        "met": ratio <= target and total_nsteer / total_decoder <= target,
        "full_forward_subset": compare([a for a, _ in full_pairs], [b for _, b in full_pairs]) if full_pairs else None,
        "research_subset_prompts": len(subset),
        "research_subset_s": round(research_s, 4),
        "research_scaled_s": round(research_scaled, 3),
        "speedup_over_research": round(research_scaled / total_nsteer, 2),
        "note": (
            f"research-code time measured on {len(subset)} prompts and scaled x{len(texts) / len(subset):g}; "
            "decoder forward = the unwrapped model's base module (embeddings, blocks, final norm), no LM head, no reads"
        ),
    }
    return result, (directions, mean_projections)
