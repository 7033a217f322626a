"""`nsteer search` of several checkouts (or settings) side by side: wall time, answers, and whether winners agree.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search.py --side old=/path/to/old --side new=. \
        --side "halving=.;search.halving=true" --recipe recipes/format.yaml [--only lowercase,title] [--rounds 1] \
        [--set search.max_prompts=4] [--bounded] [--first-token 3] [--out benchmarks/results/search-cpu.json]

Each run starts from an empty checkpoint in a fresh folder that holds a copy of the shipped vectors the recipe needs
(the side's own `vectors/smollm2-135m-instruct/`: the file format may differ between checkouts), runs the checkout's
own `nsteer search` in a subprocess (``PYTHONPATH`` = that checkout, this interpreter), and reads the `search.json` it
wrote. Rounds rotate the order of the sides. Every side uses the same de-quantized model cache
(``NSTEER_CACHE_DIR``), warmed first, so model loading costs the same where a checkout has the cache.

``--bounded`` also times, per side, a small search of one's own instruction (2 layers x 2 absolute add weights +
baseline, 4 prompts with the instruction, 48 tokens; its vector is computed first, untimed). ``--first-token N``
times ``nsteer generate`` to its first (and only) token N times per side with the warm cache, and N times on the last
side with the cache turned off (``NSTEER_NO_CACHE=1``): to the answer's line on stdout and to the process's exit.
Time it on a quiet machine under `flock /tmp/nsteer-heavy.lock`; the JSON records the load average before and after.
``--neighbours N`` keeps N other processes spinning on the CPU during every timed run (a shared machine, reproducibly):
each side then runs with the thread count it would choose for itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import cpu_model, load_average, rotated  # noqa: E402

SHIPPED = Path("vectors") / "smollm2-135m-instruct"
BOUNDED_RECIPE = {
    "name": "my-first",
    "model": {"id": "embedded:smollm2-135m-instruct", "device": "cpu"},
    "prompts": {"base": "builtin:base-v1", "seed": 0, "max_pairs": 64},
    "instructions": {
        "one_sentence": {
            "phrasings": [
                "Answer in one sentence.",
                "Reply with a single short sentence.",
                "Keep your answer to one sentence.",
                "One sentence only, please.",
            ],
            "check": {
                "id": "length_constraints:number_sentences",
                "kwargs": {"num_sentences": 2, "relation": "less than"},
            },
        }
    },
    "steer": [{"instruction": "one_sentence", "layer": "auto", "mode": "add"}],
    "search": {"layers": [12, 16], "weights": [20, 40], "condition": "present", "max_prompts": 4, "max_new_tokens": 48},
    "generation": {"max_new_tokens": 60},
}
FIRST_TOKEN = ["generate", "quickstart.yaml", "--prompt", "Why is the sky blue?", "--max-new-tokens", "1"]


def scaled_recipe(recipe: Path, only: list[str] | None, settings: list[str], folder: Path) -> Path:
    """A copy of ``recipe`` in ``folder`` keeping only the instructions ``only`` (and their steer entries), with
    ``section.field=value`` settings applied."""
    data = yaml.safe_load(recipe.read_text())
    if only:
        missing = [name for name in only if name not in data["instructions"]]
        if missing:
            raise SystemExit(f"--only names instructions the recipe does not have: {missing}")
        data["instructions"] = {name: data["instructions"][name] for name in only}
        data["steer"] = [entry for entry in data["steer"] if entry["instruction"] in only]
    for setting in settings:
        path, _, value = setting.partition("=")
        section, _, field = path.partition(".")
        data.setdefault(section, {})[field] = yaml.safe_load(value)
    data["output"] = {"dir": str(folder / "runs" / data.get("name", "recipe"))}
    target = folder / recipe.name
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def nsteer(
    checkout: Path, arguments: list[str], env: dict, cwd: Path
) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``checkout``'s own CLI with this interpreter; its wall time, its CPU time (user + system, all its threads:
    with one thread it barely moves with other processes' load) and the finished process (fails loudly)."""
    command = [sys.executable, "-m", "nsteer.cli", *arguments]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**env, "PYTHONPATH": str(checkout)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: nsteer {arguments[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, cpu, done


def search_summary(wall: float, cpu: float, report: dict, stderr: str) -> dict:
    """What one search run cost and chose: wall time, answers scored, winners, the plan line, every cell's answers."""
    answers = sum(cell["n"] for sweep in report["sweeps"] for cell in sweep["cells"])
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "search_elapsed_s": report.get("elapsed_s"),
        "answers_scored": answers,
        "answers_per_s": round(answers / wall, 3),
        "winners": {sweep["instruction"]: sweep["winner"] for sweep in report["sweeps"]},
        "plan": next((line for line in stderr.splitlines() if line.startswith("plan:")), None),
        # Scores of every cell (why a winner differs), and its answers by prompt (the order of rows may differ).
        "cells": {
            f"{sweep['instruction']} / {cell['label']}": {
                key: cell.get(key) for key in ("n", "loose", "strict", "rejected", "dropped")
            }
            for sweep in report["sweeps"]
            for cell in sweep["cells"]
        },
        "answers": {
            f"{sweep['instruction']} / {cell['label']}": sorted(zip(cell.get("prompts", ()), cell.get("answers", ())))
            for sweep in report["sweeps"]
            for cell in sweep["cells"]
        },
    }


def run_bounded(checkout: Path, env: dict) -> dict:
    """The small search of one's own instruction: its vector computed first (untimed), then the timed search."""
    with tempfile.TemporaryDirectory(prefix="nsteer-bounded-bench-") as scratch:
        folder = Path(scratch)
        recipe = folder / "my-first.yaml"
        recipe.write_text(yaml.safe_dump(BOUNDED_RECIPE, sort_keys=False))
        nsteer(checkout, ["compute", str(recipe)], env, folder)
        wall, cpu, done = nsteer(checkout, ["search", str(recipe), "--out", str(folder / "search")], env, folder)
        return search_summary(wall, cpu, json.loads((folder / "search" / "search.json").read_text()), done.stderr)


def first_token(checkout: Path, env: dict, runs: int) -> dict[str, list[float]]:
    """``nsteer generate`` to one new token with the checkout's quickstart recipe and its shipped vector (copied where
    every version looks: the recipe's output folder), one process each: seconds from the start to the answer's line
    on stdout (the first token) and to the process's exit."""
    with tempfile.TemporaryDirectory(prefix="nsteer-first-token-bench-") as scratch:
        folder = Path(scratch)
        recipe = scaled_recipe(checkout / "recipes" / "quickstart.yaml", None, [], folder)
        vectors = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
        vectors.mkdir(parents=True)
        shutil.copy(checkout / SHIPPED / "length_0.safetensors", vectors / "length_0.safetensors")
        times: dict[str, list[float]] = {"first_token_s": [], "exit_s": []}
        for _ in range(runs):
            answer, exit_ = answer_line_time(checkout, FIRST_TOKEN, env, folder)
            times["first_token_s"].append(round(answer, 2))
            times["exit_s"].append(round(exit_, 2))
        return times


def answer_line_time(checkout: Path, arguments: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """Seconds from starting ``nsteer generate`` to the line after its ``=== prompt`` header on stdout (the answer,
    printed as soon as it is generated), and to the process's exit."""
    command = [sys.executable, "-m", "nsteer.cli", *arguments]
    answer = math.nan
    header = False
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a full pipe would stall the process
        started = time.perf_counter()
        process = subprocess.Popen(
            # Unbuffered: a pipe would otherwise hold the answer until exit, which a terminal (line-buffered) does not.
            command,
            cwd=cwd,
            env={**env, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if header and math.isnan(answer):
                answer = time.perf_counter() - started
            header = header or line.startswith(b"=== ")
        if process.wait() != 0 or math.isnan(answer):
            stderr.seek(0)
            raise SystemExit(
                f"{checkout}: nsteer {arguments[0]} failed ({process.returncode}):\n{stderr.read()[-3000:]!r}"
            )
    return answer, time.perf_counter() - started


def compare_answers(first: dict, other: dict) -> dict:
    """Cells whose answers are identical to the first side's, prompt by prompt (cells both ran on the same number of
    prompts)."""
    shared = [
        key
        for key, answers in other["answers"].items()
        if answers and len(answers) == len(first["answers"].get(key) or [])
    ]
    same = [key for key in shared if other["answers"][key] == first["answers"][key]]
    return {"cells_compared": len(shared), "cells_identical": len(same), "differing": sorted(set(shared) - set(same))}


def run_search(checkout: Path, recipe: Path, only: list[str] | None, settings: list[str], env: dict) -> dict:
    """One `nsteer search` from an empty checkpoint with fresh copies of the vectors; its time and result."""
    with tempfile.TemporaryDirectory(prefix="nsteer-search-bench-") as scratch:
        folder = Path(scratch)
        copy = scaled_recipe(recipe, only, settings, folder)
        data = yaml.safe_load(copy.read_text())
        vectors = Path(data["output"]["dir"])
        vectors.mkdir(parents=True)
        for name in data["instructions"]:
            shutil.copy(checkout / SHIPPED / f"{name}.safetensors", vectors / f"{name}.safetensors")
        out = folder / "search"
        wall, cpu, done = nsteer(checkout, ["search", str(copy), "--out", str(out)], env, folder)
        return search_summary(wall, cpu, json.loads((out / "search.json").read_text()), done.stderr)


def commit_of(checkout: Path) -> str | None:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or None outside git."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def pairwise(results: dict[str, dict], names: list[str]) -> dict:
    """For every pair of sides (a listed before b): wall time a / b, winners equal, answers identical cell by cell."""
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            differing = {
                instruction: [results[a]["winners"].get(instruction), winner]
                for instruction, winner in results[b]["winners"].items()
                if results[a]["winners"].get(instruction) != winner
            }
            pairs[f"{a} vs {b}"] = {
                "wall_ratio": round(results[a]["wall_s"] / results[b]["wall_s"], 3),
                "cpu_ratio": round(results[a]["cpu_s"] / results[b]["cpu_s"], 3),
                "winners_differ": differing,
                "answers": compare_answers(results[a], results[b]),
            }
    return pairs


@contextlib.contextmanager
def neighbours(count: int) -> Iterator[None]:
    """``count`` other processes, each keeping one core busy, for as long as the block runs."""
    spinning: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            spinning.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield
    finally:
        for process in spinning:
            process.kill()
            process.wait()


def write(path: Path | None, summary: dict) -> None:
    """Write the JSON so far (after each part: a later part that fails keeps what was measured)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")


def main() -> None:
    """Parse the arguments, run the rounds, print and write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--side",
        action="append",
        required=True,
        help="NAME=CHECKOUT[;section.field=value;...], given two or more times",
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "format.yaml")
    parser.add_argument("--only", help="comma-separated instructions to keep (a scaled search)")
    parser.add_argument("--set", action="append", default=[], help="section.field=value for every side")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs every side (order rotates)")
    parser.add_argument(
        "--no-recipe", action="store_true", help="skip the recipe search (only --bounded/--first-token)"
    )
    parser.add_argument("--bounded", action="store_true", help="also time the small search of one's own instruction")
    parser.add_argument("--first-token", type=int, default=0, help="time generate to its first token N times per side")
    parser.add_argument("--neighbours", type=int, default=0, help="other processes spinning during the timed runs")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args()
    with neighbours(args.neighbours):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Every part asked for, with the sides side by side; the JSON written after each part."""
    sides = []
    for text in args.side:
        name, _, rest = text.partition("=")
        checkout, *settings = rest.split(";")
        sides.append((name, Path(checkout).resolve(), [*args.set, *settings]))
    names = [name for name, _, _ in sides]
    by_name = {name: (checkout, settings) for name, checkout, settings in sides}
    only = args.only.split(",") if args.only else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.setdefault("NSTEER_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nsteer-bench-cache"))
    warm = [sys.executable, "-c", "import nsteer.models as m; m.open_model()"]
    subprocess.run(warm, env={**env, "PYTHONPATH": str(sides[-1][1])}, check=True, capture_output=True)
    summary: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe": str(args.recipe),
        "only": only,
        "settings": args.set,
        "sides": [
            {"name": name, "checkout": str(path), "commit": commit_of(path), "settings": settings}
            for name, path, settings in sides
        ],
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "omp_num_threads": env.get("OMP_NUM_THREADS")},
        "neighbours": args.neighbours,
        "load_average_before": load_average(),
    }
    if not args.no_recipe:
        rounds = []
        for number in range(args.rounds):
            result: dict = {}
            for name in rotated(names, number):
                checkout, settings = by_name[name]
                result[name] = run_search(checkout, args.recipe.resolve(), only, settings, env)
                one = result[name]
                print(f"round {number + 1} {name}: {one['wall_s']} s (cpu {one['cpu_s']} s), n={one['answers_scored']}")
            pairs = pairwise(result, names)
            for pair, facts in pairs.items():
                same = facts["answers"]
                print(
                    f"round {number + 1} {pair}: wall {facts['wall_ratio']}x, cpu {facts['cpu_ratio']}x, "
                    f"winners differ: "
                    f"{facts['winners_differ'] or 'none'}, answers identical in "
                    f"{same['cells_identical']}/{same['cells_compared']} cells"
                )
            rounds.append(
                {
                    "sides": {name: {k: v for k, v in result[name].items() if k != "answers"} for name in names},
                    "pairs": pairs,
                }
            )
        summary["recipe_search"] = rounds
        summary["load_average_after_recipe_search"] = load_average()
        write(args.out, summary)
    if args.bounded:
        result = {}
        for name, checkout, _ in sides:
            result[name] = run_bounded(checkout, env)
            one = result[name]
            print(f"bounded {name}: {one['wall_s']} s (cpu {one['cpu_s']} s), winner {one['winners']}")
        summary["bounded_search"] = {
            "recipe": BOUNDED_RECIPE,
            "sides": {name: {k: v for k, v in result[name].items() if k != "answers"} for name in names},
            "pairs": pairwise(result, names),
        }
        summary["load_average_after_bounded"] = load_average()
        write(args.out, summary)
    if args.first_token:
        times = {name: first_token(checkout, env, args.first_token) for name, checkout, _ in sides}
        times[f"{names[-1]} NSTEER_NO_CACHE=1"] = first_token(
            sides[-1][1], {**env, "NSTEER_NO_CACHE": "1"}, args.first_token
        )
        for name, values in times.items():
            print(f"first token {name}: {values['first_token_s']} s (exit {values['exit_s']} s)")
        summary["first_token"] = {"command": "nsteer " + " ".join(FIRST_TOKEN), "seconds": times}
    summary["load_average_after"] = load_average()
    print(f"load average before {summary['load_average_before']}, after {summary['load_average_after']}")
    write(args.out, summary)


if __name__ == "__main__":
    main()
