"""How format steering moves with the number of training pairs (docs/results.md, "Pair count").

For each N in ``--pairs``: the twelve format vectors from the first N training pairs of recipes/format.yaml (64 is
the shipped set; others are read from ``--work``/pairs-N/, computed there first when missing), each given the shipped
vector's searched setting (its layer, k × its OWN ‖u_l‖, prompt only, centered on the twelve vectors of the same N).
Every steered instruction answers its first ``--prompts`` **validation** prompts with and without the instruction;
the unsteered answers are shared by all N. Scores loose and substantive passes and the degenerate share, per N and
per instruction, and the paired substantive changes of each N against 64 pairs.

    .venv/bin/python scripts/pair_count.py            # the numbers in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "vectors/smollm2-135m-instruct"


def vectors_for(recipe, handle, names, n: int, work: Path) -> dict:
    """The twelve vectors from the first ``n`` training pairs, each carrying its shipped vector's chosen setting."""
    from nsteer.extract import compute_vector
    from nsteer.pipeline import instruction_splits, resolve_instruction
    from nsteer.recipe import vector_file_name
    from nsteer.vectors import load_vector, save_vector

    found = {}
    for name in names:
        shipped = load_vector(SHIPPED / vector_file_name(name))
        if n == shipped.metadata.n_pairs:
            found[name] = shipped
            continue
        path = work / f"pairs-{n}" / vector_file_name(name)
        if not path.is_file():
            limited = recipe.model_copy(update={"prompts": recipe.prompts.model_copy(update={"max_pairs": n})})
            train = instruction_splits(limited, name).train
            if len(train) < n:
                raise SystemExit(f"{name} has only {len(train)} training pairs; --pairs asks for {n}.")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_vector(compute_vector(handle, resolve_instruction(recipe, name), train, batch_size=16), path)
        vector = load_vector(path)
        if vector.metadata.n_pairs != n:
            raise SystemExit(f"{path} holds a vector from {vector.metadata.n_pairs} pairs, not {n}: remove it.")
        found[name] = vector.with_choice(shipped.metadata.chosen)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="16,64,256")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/pair-count", help="vectors and reports")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.pairs.split(",") if n.strip()]
    if not counts or not all(1 <= n <= 4096 for n in counts) or not 1 <= args.prompts <= 1000:
        raise SystemExit("--pairs takes counts from 1 to 4096 (e.g. 16,64,256); --prompts 1..1000.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from nsteer.evaluate.checkers import CheckSpec, check_all
    from nsteer.evaluate.quality import assess, substantive
    from nsteer.evaluate.stats import paired_change
    from nsteer.generate import GenerationConfig, generate
    from nsteer.pipeline import instruction_splits, open_recipe_model, resolve_instruction, steer_entry_edits
    from nsteer.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/format.yaml")
    handle = open_recipe_model(recipe)
    names = list(dict.fromkeys(entry.instruction for entry in recipe.steer))
    started = time.monotonic()
    by_count = {n: vectors_for(recipe, handle, names, n, args.work) for n in counts}
    shipped = by_count[64] if 64 in by_count else vectors_for(recipe, handle, names, 64, args.work)
    steered = [name for name in names if shipped[name].metadata.chosen.layer is not None]
    rows: list[tuple[str, str, str, list]] = []  # (count or "unsteered", instruction, condition, edits)
    prompts: list[str] = []
    asked: dict[tuple[str, str], list[str]] = {}
    for name in steered:
        pairs = instruction_splits(recipe, name).validation[: args.prompts]
        asked[(name, "absent")] = [p.without_instruction for p in pairs]
        asked[(name, "present")] = [p.with_instruction for p in pairs]
    for label, vectors in [("unsteered", None), *((str(n), by_count[n]) for n in counts)]:
        for index, entry in enumerate(recipe.steer):
            if entry.instruction not in steered:
                continue
            edits = [] if vectors is None else steer_entry_edits(recipe, vectors, index)
            for condition in ("absent", "present"):
                for prompt in asked[(entry.instruction, condition)]:
                    rows.append((label, entry.instruction, condition, edits))
                    prompts.append(prompt)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    answers = generate(handle, prompts, row_edits=[edits for *_, edits in rows], config=config)
    scored: dict[tuple[str, str, str], list[tuple[bool, bool, bool]]] = {}
    offsets: dict[tuple[str, str, str], int] = {}
    for (label, name, condition, _), answer in zip(rows, answers):
        instruction = resolve_instruction(recipe, name)
        spec = CheckSpec(instruction.check_id, dict(instruction.check_kwargs))
        index = offsets.get((label, name, condition), 0)
        offsets[(label, name, condition)] = index + 1
        full = asked[(name, "present")][index]  # echo is judged against the full request, as in eval
        loose = check_all((spec,), answer, full)[0].loose
        quality = assess(answer, full)
        scored.setdefault((label, name, condition), []).append(
            (loose, substantive(loose, quality), quality.degenerate is not None)
        )
    report: dict = {
        "recipe": "recipes/format.yaml",
        "pairs": counts,
        "steered": steered,
        "prompts_per_condition": args.prompts,
        "split": "validation",
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "elapsed_s": round(time.monotonic() - started, 1),
        "overall": {},
        "per_instruction": {},
        "paired_vs_64": {},
    }
    labels = ["unsteered", *map(str, counts)]
    lines = ["| vectors | absent: loose / substantive / degenerate | present: loose / substantive / degenerate |"]
    lines.append("|---|---|---|")
    for label in labels:
        cells = {}
        for condition in ("absent", "present"):
            flat = [v for name in steered for v in scored[(label, name, condition)]]
            cells[condition] = {
                "loose": statistics.fmean(v[0] for v in flat),
                "substantive": statistics.fmean(v[1] for v in flat),
                "degenerate": statistics.fmean(v[2] for v in flat),
                "n": len(flat),
            }
        report["overall"][label] = cells
        shown = [f"{c['loose']:.2f} / {c['substantive']:.2f} / {c['degenerate']:.0%}" for c in cells.values()]
        lines.append(f"| {label if label == 'unsteered' else label + ' pairs'} | {shown[0]} | {shown[1]} |")
        report["per_instruction"][label] = {
            name: {c: statistics.fmean(v[1] for v in scored[(label, name, c)]) for c in ("absent", "present")}
            for name in steered
        }
    if 64 in counts:
        for n in counts:
            if n == 64:
                continue
            for condition in ("absent", "present"):
                keys = [(name, i) for name in steered for i in range(len(scored[("64", name, condition)]))]
                base = {k: scored[("64", k[0], condition)][k[1]][1] for k in keys}
                other = {k: scored[(str(n), k[0], condition)][k[1]][1] for k in keys}
                change = paired_change(base, other)
                report["paired_vs_64"][f"{n} {condition}"] = {
                    "gained": change.gained,
                    "lost": change.lost,
                    "p_value": change.p_value,
                }
    table = "\n".join(lines) + "\n"
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "pair-count.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.work / "pair-count.md").write_text(table)
    print(table)
    for key, change in report["paired_vs_64"].items():
        print(f"{key} vs 64: substantive gained {change['gained']} / lost {change['lost']} (p {change['p_value']:.2g})")
    print(f"{report['elapsed_s']} s; wrote {args.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
