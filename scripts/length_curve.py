"""Measure answer length against the weight of the shipped conciseness vector (docs/results.md, "Length").

Generates answers to the first ``--prompts`` test prompts of recipes/length.yaml's ``length_0`` split (the bare
requests, no length instruction) with the shipped ``length_0`` vector added at its searched layer (or ``--layer``)
at each weight in ``--weights`` (negative: the verbosity direction; 0: unsteered), plus two unsteered references with
the instruction in the prompt: "be extremely concise" (length_0 phrasings) and "be extremely verbose" (length_4).
Counts sentences and words with the IFEval counters, scores "fewer than 3 sentences" (loose), degeneracy and
perplexity under the model itself, and writes ``length-curve.json`` / ``.md`` and ``docs/img/length-curve.png``.

    .venv/bin/python scripts/length_curve.py            # the numbers in docs/results.md
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


def summarize(label: str, weight: float | None, prompts, answers, perplexities, spec) -> dict:
    """Means and medians of one condition's answers."""
    from nsteer.evaluate.checkers import check_all, count_sentences, count_words
    from nsteer.evaluate.quality import degeneracy

    sentences = [count_sentences(a) for a in answers]
    words = [count_words(a) for a in answers]
    loose = [check_all((spec,), a, p)[0].loose for p, a in zip(prompts, answers)]
    finite = [v for v in perplexities if math.isfinite(v)]
    return {
        "condition": label,
        "weight": weight,
        "n": len(answers),
        "mean_sentences": statistics.fmean(sentences),
        "mean_words": statistics.fmean(words),
        "median_words": statistics.median(words),
        "fewer_than_3_sentences": statistics.fmean(loose),
        "degenerate_share": statistics.fmean(degeneracy(a) is not None for a in answers),
        "median_perplexity": statistics.median(finite) if finite else None,
        "sentences": sentences,
        "words": words,
        "answers": list(answers),
    }


def plot(rows: list[dict], layer: int, max_new_tokens: int, path: Path) -> None:
    """Two panels: mean sentences and mean words against the weight, with the prompted references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [row for row in rows if row["weight"] is not None]
    references = [row for row in rows if row["weight"] is None]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for axis, key, title in ((axes[0], "mean_sentences", "mean sentences"), (axes[1], "mean_words", "mean words")):
        axis.plot(
            [r["weight"] for r in curve],
            [r[key] for r in curve],
            marker="o",
            color="tab:blue",
            label="steered, no instruction",
        )
        for row, style in zip(references, ("--", ":")):
            axis.axhline(row[key], linestyle=style, color="tab:gray", label=row["condition"])
        axis.set_xlabel(f"weight of the conciseness vector (add, layer {layer})")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    figure.suptitle(
        f"SmolLM2-135M-Instruct, {curve[0]['n']} test prompts, at most {max_new_tokens} new tokens", fontsize=9
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def markdown(rows: list[dict], layer: int) -> str:
    """The curve as a Markdown table."""
    lines = [
        "| condition | weight | mean sentences | mean words | median words | < 3 sentences | degenerate | median ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        weight = "–" if row["weight"] is None else f"{row['weight']:g}"
        ppl = "n/a" if row["median_perplexity"] is None else f"{row['median_perplexity']:.1f}"
        lines.append(
            f"| {row['condition']} | {weight} | {row['mean_sentences']:.2f} | {row['mean_words']:.1f} | "
            f"{row['median_words']:g} | {row['fewer_than_3_sentences']:.2f} | {row['degenerate_share']:.0%} | {ppl} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the curve and write its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vector", type=Path, default=ROOT / "vectors/smollm2-135m-instruct/length_0.safetensors")
    parser.add_argument("--layer", type=int, default=None, help="default: the vector's searched layer")
    parser.add_argument("--weights", default="-60,-30,0,30,60")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/length-curve")
    parser.add_argument("--png", type=Path, default=ROOT / "docs/img/length-curve.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from nsteer.edits import edit_from_vector
    from nsteer.evaluate.checkers import CheckSpec
    from nsteer.evaluate.quality import perplexity
    from nsteer.generate import GenerationConfig, generate
    from nsteer.pipeline import instruction_splits, open_recipe_model, resolve_instruction
    from nsteer.recipe import load_recipe
    from nsteer.vectors import check_compatible, load_vector

    recipe = load_recipe(ROOT / "recipes/length.yaml")
    vector = load_vector(args.vector)
    chosen = vector.metadata.chosen
    layer = args.layer if args.layer is not None else (chosen.layer if chosen else None)
    if layer is None:
        raise SystemExit(f"{args.vector} has no searched layer (the search chose no steering): pass --layer.")
    weights = [float(w) for w in args.weights.split(",")]
    handle = open_recipe_model(recipe)
    check_compatible(vector, handle)
    concise = instruction_splits(recipe, "length_0").test[: args.prompts]
    verbose = instruction_splits(recipe, "length_4").test[: args.prompts]
    spec = CheckSpec(
        resolve_instruction(recipe, "length_0").check_id, dict(resolve_instruction(recipe, "length_0").check_kwargs)
    )
    bare = [pair.without_instruction for pair in concise]
    conditions = [
        (f"w={w:g}", w, bare, [] if w == 0 else [edit_from_vector(vector, layer=layer, mode="add", weight=w)])
        for w in weights
    ]
    conditions.append(("instruction 'extremely concise', unsteered", None, [p.with_instruction for p in concise], []))
    conditions.append(("instruction 'extremely verbose', unsteered", None, [p.with_instruction for p in verbose], []))
    prompts = [p for _, _, group, _ in conditions for p in group]
    row_edits = [edits for _, _, group, edits in conditions for _ in group]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    started = time.monotonic()
    answers = generate(handle, prompts, row_edits=row_edits, config=config)
    perplexities = perplexity(handle.hf_model, handle.tokenizer, prompts, answers)
    rows, offset = [], 0
    for label, weight, group, _ in conditions:
        part = slice(offset, offset + len(group))
        rows.append(summarize(label, weight, group, answers[part], perplexities[part], spec))
        offset += len(group)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "vector": str(args.vector),
        "layer": layer,
        "mode": "add",
        "weights": weights,
        "max_new_tokens": args.max_new_tokens,
        "n_prompts": len(bare),
        "split": "test",
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    (args.out / "length-curve.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out / "length-curve.md").write_text(markdown(rows, layer))
    plot(rows, layer, args.max_new_tokens, args.png)
    print(markdown(rows, layer))
    print(f"layer {layer}; {report['elapsed_s']} s; wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
