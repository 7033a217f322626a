"""Compare a clamped `add` with a plain `add` of the same mean strength (docs/results.md, "Clamped strength").

A clamped edit lifts the projection on û_l by at most ``w`` and never past the bound ``b = z_l + c ‖u_l‖``, so at
each position it adds ``d_t = min(w, max(b − h_t·û_l, 0))``. Whether the clamp helps, or only steers more weakly, is
answered by a plain `add` whose constant weight is the clamped edit's mean lift over the same positions.

The mean lift is measured, not guessed: ``h_t·û_l`` at the edited layer does not depend on edits made at that layer
(they reach only later layers), so one unsteered forward pass over each clamped answer (its prompt and every answer
token the model read back) gives the projection the clamp saw at every position.

Runs on the first ``--prompts`` **validation** prompts of the recipe's instruction, without the instruction in the
prompt: unsteered; plain `add` at ``k ‖u_l‖``; for each clamp ``c``: clamped `add` at ``k ‖u_l‖`` and plain `add` at
its mean lift. Scores the instruction's check (loose), substantive passes, degenerate share, words, sentences and
perplexity under the model itself, and the paired substantive changes of each clamp against its equal-strength `add`.

    .venv/bin/python scripts/clamp_vs_add.py            # the numbers in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mean_lift(
    handle, prompts, answer_ids, layer: int, direction, bound: float, weight: float, max_new_tokens: int
) -> dict:
    """The clamped edit's lift ``min(w, max(b − h·û, 0))`` at every position it edited, from unsteered passes."""
    import torch

    from nsteer.extract import chat_token_ids

    lifts: list[float] = []
    generated: list[float] = []
    block = handle.hf_model.get_submodule(handle.layers_path)[layer]
    seen: list[torch.Tensor] = []

    def read_output(module, inputs, output):  # the block's output as it leaves the block (no edit here)
        seen.append((output[0] if isinstance(output, tuple) else output)[0].float())

    device = next(handle.hf_model.parameters()).device
    for prompt, ids in zip(prompts, answer_ids):
        prompt_ids = chat_token_ids(handle.tokenizer, prompt)
        # The answer comes without its end token: every token of an answer that ended was read back (the next step
        # produced the end token); an answer cut at the budget never read its last one.
        read = list(ids) if len(ids) < max_new_tokens else list(ids[:-1])
        sequence = list(prompt_ids) + read
        seen.clear()
        hook = block.register_forward_hook(read_output)
        try:
            with torch.inference_mode():
                handle.hf_model(torch.tensor([sequence], device=device))
        finally:
            hook.remove()
        projection = seen[0].cpu() @ direction.float().cpu()
        lift = torch.clamp(bound - projection, min=0.0).clamp(max=weight)
        lifts.extend(lift.tolist())
        generated.extend(lift[len(prompt_ids) :].tolist())
    return {
        "mean": statistics.fmean(lifts),
        "mean_generated": statistics.fmean(generated) if generated else None,
        "share_at_full_weight": statistics.fmean(value >= weight for value in lifts),
        "share_zero": statistics.fmean(value <= 0.0 for value in lifts),
        "positions": len(lifts),
    }


def summarize(label: str, weight, prompts, checked_prompts, answers, perplexities, spec) -> dict:
    """Means and shares of one condition's answers."""
    from nsteer.evaluate.checkers import check_all, count_sentences, count_words
    from nsteer.evaluate.quality import assess, substantive

    loose = [check_all((spec,), a, p)[0].loose for p, a in zip(prompts, answers)]
    qualities = [assess(a, p) for p, a in zip(checked_prompts, answers)]
    finite = [v for v in perplexities if math.isfinite(v)]
    words = [count_words(a) for a in answers]
    return {
        "condition": label,
        "weight": weight,
        "n": len(answers),
        "loose": statistics.fmean(loose),
        "substantive": statistics.fmean(substantive(p, q) for p, q in zip(loose, qualities)),
        "substantive_each": [substantive(p, q) for p, q in zip(loose, qualities)],
        "degenerate_share": statistics.fmean(q.degenerate is not None for q in qualities),
        "mean_words": statistics.fmean(words),
        "median_words": statistics.median(words),
        "mean_sentences": statistics.fmean(count_sentences(a) for a in answers),
        "median_perplexity": statistics.median(finite) if finite else None,
        "answers": list(answers),
    }


def markdown(rows: list[dict]) -> str:
    """The conditions as a Markdown table."""
    lines = [
        "| condition | weight | loose | substantive | degenerate | median words | mean sentences | median ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        weight = "–" if row["weight"] is None else f"{row['weight']:.1f}"
        ppl = "n/a" if row["median_perplexity"] is None else f"{row['median_perplexity']:.1f}"
        lines.append(
            f"| {row['condition']} | {weight} | {row['loose']:.2f} | {row['substantive']:.2f} | "
            f"{row['degenerate_share']:.0%} | {row['median_words']:g} | {row['mean_sentences']:.2f} | {ppl} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/length.yaml")
    parser.add_argument("--instruction", default="length_0")
    parser.add_argument("--vector", type=Path, default=None, help="default: the shipped vector of --instruction")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--k", type=float, default=2.0, help="add weight k x the layer's raw norm")
    parser.add_argument("--clamps", default="0,1", help="clamp values c: the bound is z_l + c ||u_l||")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/clamp-vs-add")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 1000 or not 1 <= args.max_new_tokens <= 8192:
        raise SystemExit("--prompts must be 1..1000 and --max-new-tokens 1..8192.")
    clamps = [float(c) for c in args.clamps.split(",") if c.strip()]
    if not clamps or not all(math.isfinite(c) and abs(c) <= 100 for c in clamps):
        raise SystemExit("--clamps takes finite numbers from -100 to 100, e.g. 0,1.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from nsteer.edits import Edit, EditOptions, relative_weight, vector_edits
    from nsteer.evaluate.checkers import CheckSpec
    from nsteer.evaluate.quality import perplexity
    from nsteer.evaluate.stats import paired_change
    from nsteer.generate import GenerationConfig, generate_tokens
    from nsteer.pipeline import instruction_splits, open_recipe_model, resolve_instruction
    from nsteer.recipe import load_recipe
    from nsteer.vectors import check_compatible, load_vector

    recipe = load_recipe(args.recipe)
    instruction = resolve_instruction(recipe, args.instruction)
    vector_path = args.vector or ROOT / f"vectors/smollm2-135m-instruct/{args.instruction}.safetensors"
    vector = load_vector(vector_path)
    handle = open_recipe_model(recipe)
    check_compatible(vector, handle)
    if not 0 <= args.layer < handle.n_layers:
        raise SystemExit(f"--layer must be 0..{handle.n_layers - 1}.")
    pairs = instruction_splits(recipe, args.instruction).validation[: args.prompts]
    bare = [pair.without_instruction for pair in pairs]
    asked = [pair.with_instruction for pair in pairs]  # echo is judged against the full request, as in eval
    spec = CheckSpec(instruction.check_id, dict(instruction.check_kwargs))
    weight = relative_weight(vector, args.layer, args.k)

    def edits(clamp: float | None, w: float) -> list[Edit]:
        return list(
            vector_edits(
                vector, layer=args.layer, mode="add", weight=w, positions="all", options=EditOptions(clamp=clamp)
            )
        )

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    started = time.monotonic()
    first = [("unsteered", None, []), (f"add {args.k:g} × ‖u‖", weight, edits(None, weight))]
    first += [(f"add {args.k:g} × ‖u‖, clamp {c:g}", weight, edits(c, weight)) for c in clamps]
    ids = generate_tokens(handle, bare * len(first), row_edits=[e for *_, e in first for _ in bare], config=config)
    by_condition = {label: ids[i * len(bare) : (i + 1) * len(bare)] for i, (label, *_) in enumerate(first)}
    direction = vector.directions[args.layer]
    z, norm = float(vector.mean_projections[args.layer]), float(vector.norms[args.layer])
    lifts = {}
    for c in clamps:
        label = f"add {args.k:g} × ‖u‖, clamp {c:g}"
        lifts[c] = mean_lift(
            handle, bare, by_condition[label], args.layer, direction, z + c * norm, weight, args.max_new_tokens
        )
    second = [(f"add at clamp {c:g}'s mean lift", lifts[c]["mean"], edits(None, lifts[c]["mean"])) for c in clamps]
    ids2 = generate_tokens(handle, bare * len(second), row_edits=[e for *_, e in second for _ in bare], config=config)
    for i, (label, *_) in enumerate(second):
        by_condition[label] = ids2[i * len(bare) : (i + 1) * len(bare)]
    conditions = first + second
    texts = {
        label: [handle.tokenizer.decode(row, skip_special_tokens=True) for row in by_condition[label]]
        for label, *_ in conditions
    }
    all_prompts = [p for _ in conditions for p in bare]
    all_answers = [a for label, *_ in conditions for a in texts[label]]
    perplexities = perplexity(handle.hf_model, handle.tokenizer, all_prompts, all_answers)
    rows = []
    for index, (label, w, _) in enumerate(conditions):
        part = slice(index * len(bare), (index + 1) * len(bare))
        rows.append(summarize(label, w, bare, asked, texts[label], perplexities[part], spec))
    by_label = {row["condition"]: row for row in rows}
    paired = {}
    for c in clamps:
        clamped = by_label[f"add {args.k:g} × ‖u‖, clamp {c:g}"]["substantive_each"]
        plain = by_label[f"add at clamp {c:g}'s mean lift"]["substantive_each"]
        change = paired_change(dict(enumerate(plain)), dict(enumerate(clamped)))
        paired[f"clamp {c:g} vs add at its mean lift"] = {
            "clamp_fixed": change.gained,
            "clamp_broke": change.lost,
            "p_value": change.p_value,
        }
    report = {
        "recipe": str(args.recipe),
        "instruction": args.instruction,
        "vector": str(vector_path),
        "layer": args.layer,
        "k": args.k,
        "weight": weight,
        "z_l": z,
        "norm_l": norm,
        "clamps": {f"{c:g}": {"bound": z + c * norm, "lift": lifts[c]} for c in clamps},
        "split": "validation",
        "n_prompts": len(bare),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "paired_substantive": paired,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clamp-vs-add.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out / "clamp-vs-add.md").write_text(markdown(rows))
    print(markdown(rows))
    for c in clamps:
        lift = lifts[c]
        print(
            f"clamp {c:g}: bound {z + c * norm:.1f} (z {z:.1f}, ‖u‖ {norm:.1f}); mean lift {lift['mean']:.1f} of "
            f"w {weight:.1f} ({lift['share_at_full_weight']:.0%} of positions at full weight, "
            f"{lift['share_zero']:.0%} at zero; generated tokens {lift['mean_generated']:.1f})"
        )
    for name, change in paired.items():
        fixed, broke = change["clamp_fixed"], change["clamp_broke"]
        print(f"{name}: substantive fixed {fixed} / broke {broke} (p {change['p_value']:.2g})")
    print(f"{report['elapsed_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
