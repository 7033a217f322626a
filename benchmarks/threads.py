"""How torch's thread count fares beside other work: the evidence behind the command line's automatic thread count.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/threads.py [--loads 0,0.2,0.4,0.6,0.8,1] [--rounds 2] \
        [--out benchmarks/results/threads-cpu.json]

For each load, one other process keeps a core busy that share of the time (it spins for its share of every 10 ms and
sleeps the rest; 1 spins without a pause), and the embedded model generates a batch of 20 prompts, 32 new tokens each
(forced), at every thread count from 1 to the cores, each in a fresh process. Per load, the JSON holds each count's
wall seconds per round and their median, and which count was fastest. It also records what nsteer's governor would
choose at that load (nsteer.threads.free_threads over a window measured while the other process runs alone), so the
two can be compared. Run it on an otherwise quiet machine: other work is exactly what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import cpu_model, load_average  # noqa: E402
from nsteer.threads import free_threads, read_sample  # noqa: E402

NEIGHBOUR = """
import sys, time
share, period = float(sys.argv[1]), 0.01
while True:
    end = time.monotonic() + share * period
    while time.monotonic() < end:
        pass
    if share < 1:
        time.sleep((1 - share) * period)
"""

GENERATE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from nsteer.models import open_model
handle = open_model()
model, tokenizer = handle.hf_model, handle.tokenizer
prompts = ["Describe the water cycle.", "What should I pack for a weekend hiking trip?",
           "Explain photosynthesis to a child.", "Write a short story about a cat.", "Why is the sky blue?"] * 4
texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in prompts]
tokenizer.padding_side = "left"
batch = tokenizer(texts, return_tensors="pt", padding=True)
with torch.inference_mode():
    model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm
    started = time.perf_counter()
    model.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(time.perf_counter() - started)
"""


def governor_choice(cores: int) -> int | None:
    """What the governor would give torch now: a 2 s window with this process idle."""
    before = read_sample()
    time.sleep(2.0)
    after = read_sample()
    if before is None or after is None:
        return None
    return free_threads(before, after, cpus=cores, most=cores)


def generate_seconds(threads: int, env: dict) -> float:
    """Seconds one fresh process takes for the batch at ``threads``."""
    done = subprocess.run(
        [sys.executable, "-c", GENERATE, str(threads)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"generation at {threads} threads failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0,0.2,0.4,0.6,0.8,1", help="the other process's busy shares")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    summary: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "cores": cores},
        "load_average_before": load_average(),
        "loads": [],
    }
    for share in [float(text) for text in args.loads.split(",")]:
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(share)]) if share > 0 else None
        try:
            time.sleep(0.5)
            chosen = governor_choice(cores)
            seconds: dict[int, list[float]] = {count: [] for count in range(1, cores + 1)}
            for round_index in range(args.rounds):
                order = list(seconds)[round_index % cores :] + list(seconds)[: round_index % cores]
                for count in order:
                    seconds[count].append(round(generate_seconds(count, env), 3))
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        medians = {count: statistics.median(values) for count, values in seconds.items()}
        fastest = min(medians, key=lambda count: medians[count])
        row = {"busy_share": share, "seconds": seconds, "median_s": medians, "fastest": fastest, "governor": chosen}
        summary["loads"].append(row)
        shown = ", ".join(f"{count} thread(s) {medians[count]:.2f} s" for count in medians)
        print(f"other process busy {share:.0%}: {shown}; fastest {fastest}, governor chooses {chosen}", flush=True)
    summary["load_average_after"] = load_average()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
