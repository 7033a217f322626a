"""The bad-input matrix: every kind of bad input nsteer accepts, run through the real `nsteer` entry point.

Each row builds its bad input in a temporary folder, runs ``nsteer ARGS`` in this process through ``nsteer.cli.main``
(the console script's own function: argv, nnsight import, error handling and exit code included), and asserts

- the exit code (2 for user errors and usage errors),
- that the message names the problem (every fragment of the row appears in it),
- a user error is one paragraph starting with ``error:``,
- and that nothing escapes as an uncaught exception / traceback.

A few rows also run through the installed ``nsteer`` executable in a fresh process (``SUBPROCESS_ROWS``).
Rows that need a model use a tiny random Llama saved with ``save_pretrained`` (4 layers, width 64).
To add a row: append a ``Row`` to ``ROWS`` with a builder that writes its files under ``env.tmp`` and returns argv.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from nsteer.cli import main
from nsteer.searched import SearchedSetting
from nsteer.vectors import FORMAT, SteeringVector, VectorMetadata, save_vector

NSTEER = Path(sys.executable).parent / "nsteer"


# --------------------------------------------------------------------------------------------------- environment


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama saved to disk, and its handle's identity (for vectors that must match it)."""
    from tiny import tiny_hf_model, tiny_tokenizer

    from nsteer.models import open_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", seed=0).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    handle = open_model(str(directory))
    return directory, handle


@dataclass
class Env:
    """What a row's builder gets: a fresh folder and helpers that write inputs into it."""

    tmp: Path
    model_dir: Path
    handle: object

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def recipe(self, text: str, name: str = "recipe.yaml") -> str:
        """Write a recipe; ``@MODEL@`` is the tiny model's folder and ``@TMP@`` this row's folder."""
        return self.file(name, text.replace("@MODEL@", str(self.model_dir)).replace("@TMP@", str(self.tmp)))

    def tiny_recipe(
        self,
        *,
        model: str | None = None,
        steer: str | None = None,
        output: str = '{dir: "@TMP@/out"}',
        extra: str = "",
        name: str = "tiny.yaml",
    ) -> str:
        """A valid recipe for the tiny model; ``model`` / ``steer`` / ``output`` / ``extra`` replace or add parts."""
        model = model or '{id: "@MODEL@", device: cpu}'
        steer = steer if steer is not None else "  - {instruction: shout, layer: 1, mode: add, weight: 4.0}"
        return self.recipe(
            f"""name: tiny
model: {model}
prompts: {{base: "builtin:base-v1", seed: 0, max_pairs: 4}}
instructions:
  shout: {{phrasings: [Answer in capitals., Use only capital letters.], check: change_case:english_capital}}
steer:
{steer}
generation: {{max_new_tokens: 2, batch_size: 2}}
output: {output}
{extra}""",
            name,
        )

    def vector(
        self,
        name: str = "v.safetensors",
        *,
        matching: bool = True,
        nan: bool = False,
        hidden: int | None = None,
        layers: int | None = None,
        chosen: SearchedSetting | None = None,
        **meta,
    ) -> str:
        """A vector file: by default one that fits the tiny model exactly."""
        handle = self.handle
        n_layers = layers or handle.n_layers
        width = hidden or handle.hidden_size
        metadata = VectorMetadata(
            nsteer_version="0.1.0",
            model_id=handle.model_id if matching else "someone/other-model",
            config_hash=handle.config_hash if matching else "0000",
            weights_fingerprint=handle.weights_fingerprint if matching else "ffff",
            architecture=handle.architecture,
            hidden_size=width,
            n_layers=n_layers,
            **{"instruction_id": "shout", **meta},
            category="format",
            n_pairs=4,
            chosen=chosen,
        )
        directions = torch.nn.functional.normalize(torch.randn(n_layers, width), dim=-1)
        if nan:  # save_vector refuses to write it: write the file as a broken tool would
            directions[1, 3] = float("nan")
            tensors = {
                "directions": directions,
                "mean_projections": torch.ones(n_layers),
                "norms": torch.ones(n_layers),
            }
            return self.raw_safetensors(name, tensors, {"format": FORMAT, "nsteer": metadata.to_json()})
        vector = SteeringVector(directions, torch.ones(n_layers), torch.ones(n_layers), metadata)
        return str(save_vector(vector, self.tmp / name))

    def raw_safetensors(self, name: str, tensors: dict, metadata: dict | None) -> str:
        from safetensors.torch import save_file

        path = self.tmp / name
        save_file(tensors, str(path), metadata=metadata)
        return str(path)


def good_tensors(layers: int = 4, width: int = 64) -> dict:
    return {
        "directions": torch.nn.functional.normalize(torch.randn(layers, width), dim=-1),
        "mean_projections": torch.ones(layers),
        "norms": torch.ones(layers),
    }


def good_metadata_json(**changes) -> str:
    data = {
        "nsteer_version": "0.1.0",
        "model_id": "m",
        "config_hash": "c",
        "weights_fingerprint": "f",
        "architecture": "LlamaForCausalLM",
        "hidden_size": 64,
        "n_layers": 4,
        "instruction_id": "shout",
    }
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not None})


def truncated_vector(env: Env) -> str:
    path = Path(env.vector("full.safetensors"))
    payload = path.read_bytes()
    return env.file("truncated.safetensors", payload[: len(payload) // 2])


def wrong_header_length(env: Env) -> str:
    return env.file("huge-header.safetensors", struct.pack("<Q", 10**15) + b"{}")


def control_vector(env: Env, *, source: dict | None = None, layer: str = "1") -> str:
    """A llama.cpp control vector for the tiny model's width, optionally with an nsteer.source record."""
    import gguf
    import numpy as np

    path = env.tmp / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "tiny")
    writer.add_uint32("controlvector.layer_count", 1)
    if source is not None:
        writer.add_string("nsteer.source", json.dumps(source))
    writer.add_tensor(f"direction.{layer}", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def job_record(job_id: str, **changes) -> str:
    """A well-formed NDIF job record (as `--no-wait` writes one), with ``changes``."""
    record = {
        "id": job_id,
        "kind": "vector",
        "model_id": "org/model",
        "model_key": "nnsight.modeling.transformers.TransformersModel:{}",
        "host": "https://api.ndif.us",
        "revision": None,
        "created": 1.0,
        "payload": {},
    }
    return json.dumps({**record, **changes})


def ifeval_line(**changes) -> str:
    record = {
        "key": 1,
        "prompt": "Write in capitals.",
        "instruction_id_list": ["change_case:english_capital"],
        "kwargs": [{}],
    }
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One bad input: how to build it (returns argv), the exit code, and fragments the message must contain."""

    id: str
    build: Callable[[Env], list[str]]
    fragments: tuple[str, ...]
    code: int = 2
    usage: bool = False  # a click usage error ("Usage: ... Error: ...") rather than an nsteer error
    env: dict = field(default_factory=dict)  # environment variables to set (None: unset)


R = Row
MINIMAL = "instructions:\n  lowercase: {}\n"
# "Billion laughs": five lines of aliases, each listing the previous line nine times (9**6 values, a few hundred bytes).
ALIAS_BOMB = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]\n" for level in range(1, 6)]
)

ROWS: list[Row] = [
    # --- recipes ------------------------------------------------------------------------------------------------
    R("recipe-missing", lambda e: ["compute", str(e.tmp / "nope.yaml")], ("Recipe file not found", "nope.yaml")),
    R("recipe-is-a-directory", lambda e: ["compute", str(e.tmp)], ("is a folder, not a recipe file",)),
    R("recipe-empty", lambda e: ["compute", e.recipe("")], ("the recipe is empty", "instructions")),
    R("recipe-only-a-comment", lambda e: ["compute", e.recipe("# nothing yet\n")], ("the recipe is empty",)),
    R(
        "recipe-not-utf8",
        lambda e: ["compute", e.file("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))],
        ("line 1", "not UTF-8 text", "at byte 9"),
    ),
    R(
        "yaml-unterminated-quote",
        lambda e: ["compute", e.recipe("name: 'oops\ninstructions: {}\n")],
        ("invalid YAML", "line"),
    ),
    R(
        "yaml-bad-indentation",
        lambda e: ["compute", e.recipe("instructions:\n  lowercase: {}\n bad: 1\n")],
        ("invalid YAML", "line 3"),
    ),
    R(
        "yaml-tab-indentation",
        lambda e: ["compute", e.recipe("instructions:\n\tlowercase: {}\n")],
        ("invalid YAML", "line 2"),
    ),
    R(
        "yaml-python-tag",
        lambda e: ["compute", e.recipe("name: !!python/object/apply:os.system [ls]\n" + MINIMAL)],
        ("invalid YAML",),
    ),
    R(
        "recipe-is-a-list",
        lambda e: ["compute", e.recipe("- lowercase\n- uppercase\n")],
        ("a recipe must be a mapping of sections, got list",),
    ),
    R(
        "recipe-is-a-scalar",
        lambda e: ["compute", e.recipe("just some words\n")],
        ("a recipe must be a mapping", "got str"),
    ),
    R(
        "unknown-top-level-key",
        lambda e: ["compute", e.recipe("instruction:\n  lowercase: {}\n")],
        ("line 1", "unknown key 'instruction'", "Did you mean 'instructions'?"),
    ),
    R(
        "unknown-model-key",
        lambda e: ["compute", e.recipe("model: {dtyp: float32}\n" + MINIMAL)],
        ("line 1", "model.dtyp", "unknown key 'dtyp'"),
    ),
    R("instructions-missing", lambda e: ["compute", e.recipe("name: x\n")], ("field instructions", "required")),
    R(
        "instructions-empty",
        lambda e: ["compute", e.recipe("instructions: {}\n")],
        ("field instructions", "at least 1"),
    ),
    R(
        "instructions-a-list",
        lambda e: ["compute", e.recipe("instructions: [lowercase]\n")],
        ("field instructions", "valid dictionary"),
    ),
    R(
        "dtype-unknown",
        lambda e: ["compute", e.recipe("model: {dtype: float64}\n" + MINIMAL)],
        ("model.dtype", "float32", "float64"),
    ),
    R(
        "backend-unknown",
        lambda e: ["compute", e.recipe("model: {backend: cloud}\n" + MINIMAL)],
        ("model.backend", "'local' or 'ndif'"),
    ),
    R("device-unknown", lambda e: ["compute", e.recipe("model: {device: gpu}\n" + MINIMAL)], ("model.device", "'gpu'")),
    R(
        "layers-path-into-interpreter-internals",
        lambda e: ["compute", e.recipe("model: {layers_path: __class__.__init__.__globals__}\n" + MINIMAL)],
        ("model.layers_path", "should match pattern"),
    ),
    R(
        "timeout-not-positive",
        lambda e: ["compute", e.recipe("model: {timeout: 0}\n" + MINIMAL)],
        ("model.timeout", "greater than 0"),
    ),
    R(
        "steer-unknown-instruction",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: uppercase, layer: 1}\n")],
        ("line 4", "steer[0].instruction", "'uppercase' is not one of the recipe's instructions"),
    ),
    R(
        "steer-weight-a-word",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, weight: big}\n")],
        ("steer[0].weight", "valid number", "'big'"),
    ),
    R(
        "steer-weight-a-quoted-number",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, weight: '8'}\n")],
        ("steer[0].weight", "valid number"),
    ),
    R(
        "steer-weight-nan",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, weight: .nan}\n")],
        ("steer[0].weight", "finite"),
    ),
    R(
        "steer-weight-overflows-auto",
        lambda e: [
            "compute",
            e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, mode: add, weight: 1.0e+308}\n"),
        ],
        ("steer[0].weight", "1e+308 overflows the model's dtype (auto opens bfloat16 or float32)"),
    ),
    R(
        "steer-weight-overflows-float16",
        lambda e: [
            "compute",
            e.recipe("model: {dtype: float16}\n" + MINIMAL + "steer:\n  - {instruction: lowercase, weight: 70000}\n"),
        ],
        ("steer[0].weight", "overflows the model's float16"),
    ),
    R(
        "steer-layer-negative",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, layer: -1}\n")],
        ("steer[0].layer", "0 or more"),
    ),
    R(
        "steer-layer-yes",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, layer: yes}\n")],
        ("steer[0].layer", "valid integer", "True"),
    ),
    R(
        "steer-layer-a-word",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, layer: middle}\n")],
        ("steer[0].layer", "'middle'"),
    ),
    R(
        "steer-mode-unknown",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, mode: multiply}\n")],
        ("steer[0].mode", "'set', 'add' or 'ablate'"),
    ),
    R(
        "steer-positions-unknown",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, positions: end}\n")],
        ("steer[0].positions", "'all', 'prompt' or 'generated'"),
    ),
    R(
        "steer-not-a-list",
        lambda e: ["compute", e.recipe(MINIMAL + "steer: {instruction: lowercase}\n")],
        ("field steer", "valid list"),
    ),
    R(
        "steer-vector-file-missing",
        lambda e: ["compute", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, vector: gone.safetensors}\n")],
        ("steer[0].vector", "'gone.safetensors' not found"),
    ),
    R(
        "split-over-one",
        lambda e: ["compute", e.recipe("prompts: {split: {train: 0.8, validation: 0.2, test: 0.2}}\n" + MINIMAL)],
        ("prompts.split", "must not exceed 1"),
    ),
    R(
        "split-train-zero",
        lambda e: ["compute", e.recipe("prompts: {split: {train: 0, validation: 0.5, test: 0.5}}\n" + MINIMAL)],
        ("prompts.split", "train fraction must be positive"),
    ),
    R(
        "seed-negative",
        lambda e: ["compute", e.recipe("prompts: {seed: -3}\n" + MINIMAL)],
        ("prompts.seed", "greater than or equal to 0"),
    ),
    R(
        "seed-too-large",
        lambda e: ["compute", e.recipe("prompts: {seed: 100000000000000000000}\n" + MINIMAL)],
        ("prompts.seed", "less than or equal to 9223372036854775807"),
    ),
    R(
        "generation-seed-too-large",
        lambda e: [
            "generate",
            e.recipe("generation: {do_sample: true, seed: 100000000000000000000}\n" + MINIMAL),
            "--no-steer",
        ],
        ("generation.seed", "less than or equal to 9223372036854775807"),
    ),
    R(
        "max-pairs-zero",
        lambda e: ["compute", e.recipe("prompts: {max_pairs: 0}\n" + MINIMAL)],
        ("prompts.max_pairs", "greater than 0"),
    ),
    R(
        "max-new-tokens-zero",
        lambda e: ["compute", e.recipe("generation: {max_new_tokens: 0}\n" + MINIMAL)],
        ("generation.max_new_tokens", "greater than 0"),
    ),
    R(
        "do-sample-a-word",
        lambda e: ["compute", e.recipe("generation: {do_sample: maybe}\n" + MINIMAL)],
        ("generation.do_sample", "valid boolean"),
    ),
    R(
        "search-weights-empty",
        lambda e: ["compute", e.recipe("search: {weights: []}\n" + MINIMAL)],
        ("search.weights", "at least 1"),
    ),
    R(
        "instructions-sharing-a-vector-file",
        lambda e: ["compute", e.recipe("instructions:\n  'my style': {}\n  my-style: {}\n")],
        ("instructions.my-style", "'my-style' and 'my style' would both write the vector file my-style.safetensors"),
    ),
    R(
        "instructions-differing-only-in-case",
        lambda e: ["compute", e.recipe("instructions:\n  lowercase: {}\n  Lowercase: {}\n")],
        ("would both write the vector file",),
    ),
    R(
        "unknown-builtin-instruction",
        lambda e: ["compute", e.recipe("instructions:\n  sarcasm: {}\n")],
        ("instructions.sarcasm.phrasings", "Unknown built-in instruction 'sarcasm'", "Give `phrasings`"),
    ),
    R(
        "include-without-a-word",
        lambda e: ["compute", e.recipe("instructions:\n  'include:': {}\n")],
        ("names no word", "include:ocean"),
    ),
    R(
        "phrasings-empty-list",
        lambda e: ["compute", e.recipe("instructions:\n  mine: {phrasings: []}\n")],
        ("instructions.mine.phrasings", "non-empty list"),
    ),
    R(
        "phrasings-a-number",
        lambda e: ["compute", e.recipe("instructions:\n  mine: {phrasings: 5}\n")],
        ("instructions.mine.phrasings", "valid string"),
    ),
    R(
        "check-unknown-id",
        lambda e: [
            "compute",
            e.recipe("instructions:\n  mine: {phrasings: [Be brief.], check: change_case:english_lowercas}\n"),
        ],
        ("instructions.mine.check", "Unknown IFEval instruction id", "Did you mean 'change_case:english_lowercase'"),
    ),
    R(
        "check-missing-kwargs",
        lambda e: [
            "compute",
            e.recipe(
                "instructions:\n  mine: {phrasings: [Be brief.], check: {id: length_constraints:number_sentences}}\n"
            ),
        ],
        ("instructions.mine.check", "missing kwarg(s)", "num_sentences"),
    ),
    R(
        "check-bad-kwarg",
        lambda e: [
            "compute",
            e.recipe(
                "instructions:\n  mine:\n    phrasings: [Be brief.]\n"
                "    check: {id: keywords:existence, kwargs: {keywords: ocean}}\n"
            ),
        ],
        ("instructions.mine.check", "keywords='ocean' is invalid"),
    ),
    R(
        "duplicate-key",
        lambda e: ["compute", e.recipe("name: a\ninstructions:\n  lowercase: {}\nname: b\n")],
        ("line 4", "appears twice", "first on line 1"),
    ),
    R(
        "name-with-a-space",
        lambda e: ["compute", e.recipe("name: my recipe\n" + MINIMAL)],
        ("field name", "should match pattern"),
    ),
    R(
        "name-a-parent-folder",
        lambda e: ["compute", e.recipe("name: ..\n" + MINIMAL)],
        ("field name", "should match pattern"),
    ),
    R(
        "name-too-long",
        lambda e: ["compute", e.recipe("name: " + "n" * 300 + "\n" + MINIMAL)],
        ("field name", "at most 100 characters"),
    ),
    R(
        "yaml-alias-bomb",
        lambda e: ["compute", e.recipe(ALIAS_BOMB + MINIMAL)],
        ("line 6", "invalid YAML", "aliases", "expand the document by more than 100,000 values"),
    ),
    R(
        "yaml-alias-cycle",
        lambda e: ["compute", e.recipe("instructions: &i\n  lowercase: {}\n  more: *i\n")],
        ("line 3", "the alias *i refers to a node that contains it"),
    ),
    R(
        "yaml-nested-too-deep",
        lambda e: ["compute", e.recipe(MINIMAL + "demo_prompts: " + "[" * 400 + "]" * 400 + "\n")],
        ("line 3", "nested more than 100 levels"),
    ),
    R(
        "yaml-huge-integer",
        lambda e: ["compute", e.recipe("prompts: {seed: " + "9" * 5000 + "}\n" + MINIMAL)],
        ("invalid YAML", "a number has more than 4300 digits"),
    ),
    R(
        "recipe-is-a-fifo",
        lambda e: [os.mkfifo(e.tmp / "r.yaml") or "compute", str(e.tmp / "r.yaml")],
        ("is a named pipe (FIFO), not a recipe file",),
    ),
    R(
        "recipe-larger-than-a-megabyte",
        lambda e: ["compute", e.recipe(MINIMAL + "# padding\n" * 120_000)],
        ("the recipe file is larger than 1 MiB",),
    ),
    R(
        "search-max-new-tokens-over-the-bound",
        lambda e: ["compute", e.recipe("search: {max_new_tokens: 100000}\n" + MINIMAL)],
        ("search.max_new_tokens", "less than or equal to 8192"),
    ),
    R(
        "temperature-infinite",
        lambda e: ["compute", e.recipe("generation: {temperature: .inf}\n" + MINIMAL)],
        ("generation.temperature", "finite number"),
    ),
    R(
        "demo-prompt-blank",
        lambda e: ["compute", e.recipe("demo_prompts: [Hi, '  ']\n" + MINIMAL)],
        ("field demo_prompts", "must not hold an empty prompt"),
    ),
    R(
        "builtin-prompt-set-unknown",
        lambda e: ["compute", e.recipe("prompts: {base: 'builtin:base-v9'}\n" + MINIMAL)],
        ("prompts.base", "Unknown built-in prompt set 'base-v9'"),
    ),
    # --- prompt and data files ----------------------------------------------------------------------------------
    R(
        "base-prompts-missing",
        lambda e: ["compute", e.recipe("prompts: {base: none.jsonl}\n" + MINIMAL)],
        ("prompts.base", "Prompt file not found", "none.jsonl"),
    ),
    R(
        "base-prompts-empty",
        lambda e: [e.file("base.jsonl", "\n\n") and "compute", e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL)],
        ("prompts.base", "the prompt file is empty"),
    ),
    R(
        "base-prompts-bad-json-line",
        lambda e: [
            e.file("base.jsonl", '{"text": "a"}\n{"text": "b"\n') and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("base.jsonl, line 2", "not valid JSON"),
    ),
    R(
        "base-prompts-missing-field",
        lambda e: [
            e.file("base.jsonl", '{"text": "a"}\n{"prompt_text": "b"}\n') and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("base.jsonl, line 2", "missing a non-empty 'text'"),
    ),
    R(
        "base-prompts-empty-text",
        lambda e: [
            e.file("base.jsonl", '{"text": "  "}\n') and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("line 1", "missing a non-empty 'text'"),
    ),
    R(
        "base-prompts-duplicate-ids",
        lambda e: [
            e.file("base.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n') and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("prompt ids are not unique", "1"),
    ),
    R(
        "base-prompts-json-not-a-list",
        lambda e: [
            e.file("base.json", '{"text": "a"}') and "compute",
            e.recipe("prompts: {base: base.json}\n" + MINIMAL),
        ],
        ("base.json", "expected a list of prompts"),
    ),
    R(
        "base-prompts-yaml-broken",
        lambda e: [
            e.file("base.yaml", "- a\n - b: [\n") and "compute",
            e.recipe("prompts: {base: base.yaml}\n" + MINIMAL, "r.yaml"),
        ],
        ("base.yaml", "cannot be parsed"),
    ),
    R(
        "base-prompts-not-utf8",
        lambda e: [
            e.file("base.jsonl", b'{"text": "caf\xe9"}\n') and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("base.jsonl", "not UTF-8 text"),
    ),
    R(
        "base-prompts-yaml-alias-bomb",
        lambda e: [
            e.file("base.yaml", ALIAS_BOMB + "prompts: [a]\n") and "compute",
            e.recipe("prompts: {base: base.yaml}\n" + MINIMAL, "r.yaml"),
        ],
        ("prompts.base", "base.yaml", "aliases"),
    ),
    R(
        "base-prompts-json-too-deep",
        lambda e: [
            e.file("base.json", "[" * 100_000 + "]" * 100_000) and "compute",
            e.recipe("prompts: {base: base.json}\n" + MINIMAL),
        ],
        ("prompts.base", "base.json", "nested too deeply"),
    ),
    R(
        "base-prompts-line-too-long",
        lambda e: [
            e.file("base.jsonl", json.dumps({"text": "x" * (1 << 20)}) + "\n") and "compute",
            e.recipe("prompts: {base: base.jsonl}\n" + MINIMAL),
        ],
        ("base.jsonl, line 1", "characters long", "limited to 1,048,576"),
    ),
    R(
        "phrasings-file-empty",
        lambda e: [
            e.file("p.jsonl", "") and "compute",
            e.recipe("instructions:\n  mine: {phrasings: p.jsonl, check: change_case:english_capital}\n"),
        ],
        ("instructions.mine.phrasings", "are empty"),
    ),
    R(
        "phrasings-file-missing",
        lambda e: ["compute", e.recipe("instructions:\n  mine: {phrasings: ~nosuchuser_nsteer/p.jsonl}\n")],
        ("instructions.mine.phrasings", "Prompt file not found"),
    ),
    R(
        "eval-data-bad-json-line",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", e.file("d.jsonl", ifeval_line() + "\n{broken\n")],
        ("d.jsonl, line 2", "not valid JSON"),
    ),
    R(
        "eval-data-backtracking-keyword",
        lambda e: [
            "eval",
            e.tiny_recipe(steer="  []"),
            "--data",
            e.file(
                "d.jsonl",
                ifeval_line(instruction_id_list=["keywords:existence"], kwargs=[{"keywords": ["(a+)+$"]}]) + "\n",
            ),
        ],
        ("d.jsonl, line 1", "repeats or alternates ('+')"),
    ),
    R(
        "eval-data-missing-field",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", e.file("d.jsonl", ifeval_line(kwargs=None) + "\n")],
        ("d.jsonl, line 1", "missing kwargs"),
    ),
    R(
        "eval-data-empty",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", e.file("d.jsonl", "\n")],
        ("holds no records",),
    ),
    R(
        "eval-data-missing",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", str(e.tmp / "none.jsonl")],
        ("IFEval data file not found",),
    ),
    R(
        "eval-data-not-utf8",
        lambda e: [
            "eval",
            e.tiny_recipe(steer="  []"),
            "--data",
            e.file("d.jsonl", (ifeval_line() + "\n").encode() + b'{"key": "caf\xe9"}\n'),
        ],
        ("d.jsonl, line 2", "not UTF-8 text"),
    ),
    R(
        "eval-data-nested-too-deep",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", e.file("d.jsonl", "[" * 100_000 + "\n")],
        ("d.jsonl, line 1", "nested too deeply"),
    ),
    R(
        "eval-data-huge-integer",
        lambda e: [
            "eval",
            e.tiny_recipe(steer="  []"),
            "--data",
            e.file("d.jsonl", ifeval_line().replace('"key": 1', '"key": ' + "9" * 5000)),
        ],
        ("d.jsonl, line 1", "more than 4300 digits"),
    ),
    R(
        "eval-data-line-too-long",
        lambda e: [
            "eval",
            e.tiny_recipe(steer="  []"),
            "--data",
            e.file("d.jsonl", ifeval_line(prompt="Write. " * 200_000) + "\n"),
        ],
        ("d.jsonl, line 1", "characters long"),
    ),
    R(
        "eval-data-is-a-folder",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--data", str(e.tmp)],
        ("is a folder, not an IFEval data file",),
    ),
    # --- vector files -------------------------------------------------------------------------------------------
    R(
        "vector-missing",
        lambda e: ["inspect", str(e.tmp / "none.safetensors")],
        ("Vector file not found", "nsteer compute"),
    ),
    R("vector-is-a-directory", lambda e: ["inspect", str(e.tmp)], ("is a folder, not a vector file",)),
    R(
        "vector-is-a-device",
        lambda e: ["inspect", "/dev/null"],
        ("/dev/null is a character device, not a vector file",),
    ),
    R(
        "import-a-folder",
        lambda e: ["import", str(e.tmp), "--out", str(e.tmp / "o.safetensors")],
        ("is a folder, not a control vector file",),
    ),
    R(
        "vector-truncated",
        lambda e: ["inspect", truncated_vector(e)],
        ("truncated.safetensors", "not a readable safetensors vector file"),
    ),
    R("vector-empty-file", lambda e: ["inspect", e.file("empty.safetensors", b"")], ("not a readable safetensors",)),
    R(
        "vector-not-safetensors",
        lambda e: ["inspect", e.file("v.safetensors", "directions: [1, 2, 3]\n")],
        ("not a readable safetensors", "another format"),
    ),
    R(
        "vector-is-a-pickle",
        lambda e: ["inspect", e.file("v.pt", b"\x80\x04\x95\x00\x00\x00\x00")],
        ("not a readable safetensors",),
    ),
    R("vector-header-length-absurd", lambda e: ["inspect", wrong_header_length(e)], ("not a readable safetensors",)),
    R(
        "vector-without-nsteer-metadata",
        lambda e: ["inspect", e.raw_safetensors("plain.safetensors", good_tensors(), None)],
        ("not an nsteer vector", FORMAT),
    ),
    R(
        "vector-metadata-missing-fields",
        lambda e: [
            "inspect",
            e.raw_safetensors(
                "m.safetensors",
                good_tensors(),
                {"format": FORMAT, "nsteer": good_metadata_json(hidden_size=None, n_layers=None)},
            ),
        ],
        ("the metadata lacks", "hidden_size", "n_layers"),
    ),
    R(
        "vector-metadata-not-json",
        lambda e: [
            "inspect",
            e.raw_safetensors("m.safetensors", good_tensors(), {"format": FORMAT, "nsteer": "{not json"}),
        ],
        ("metadata is not valid JSON",),
    ),
    R(
        "vector-missing-tensor",
        lambda e: [
            "inspect",
            e.raw_safetensors(
                "m.safetensors",
                {k: v for k, v in good_tensors().items() if k != "norms"},
                {"format": FORMAT, "nsteer": good_metadata_json()},
            ),
        ],
        ("lacks the tensor(s) norms",),
    ),
    R(
        "vector-shape-disagrees-with-metadata",
        lambda e: [
            "inspect",
            e.raw_safetensors(
                "m.safetensors", good_tensors(width=32), {"format": FORMAT, "nsteer": good_metadata_json()}
            ),
        ],
        ("do not match the metadata", "width 64"),
    ),
    R("vector-nan", lambda e: ["inspect", e.vector(nan=True)], ("'directions' holds NaN or infinite values",)),
    R(
        "vector-for-another-model",
        lambda e: [
            "generate",
            e.tiny_recipe(steer=f"  - {{instruction: shout, layer: 1, vector: {e.vector(matching=False)}}}"),
            "-p",
            "Hi",
        ],
        ("computed on another model", "someone/other-model", "--allow-transfer"),
    ),
    R(
        "vector-for-another-shape",
        lambda e: [
            "generate",
            e.tiny_recipe(steer=f"  - {{instruction: shout, layer: 1, vector: {e.vector(matching=False, hidden=32)}}}"),
            "-p",
            "Hi",
        ],
        ("width 32", "width 64", "same width and depth"),
    ),
    R(
        "vector-renamed-for-another-instruction",
        lambda e: [
            e.vector("out/shout.safetensors", instruction_id="whisper") and "generate",
            e.tiny_recipe(),
            "-p",
            "Hi",
        ],
        ("shout.safetensors holds the vector of 'whisper', not of 'shout'", "vector:"),
    ),
    R(
        "vector-raw-mean-difference-not-unit",
        lambda e: [
            "inspect",
            e.raw_safetensors(
                "m.safetensors",
                {**good_tensors(), "directions": 40.0 * good_tensors()["directions"]},
                {"format": FORMAT, "nsteer": good_metadata_json()},
            ),
        ],
        ("directions of layer(s) [0, 1, 2, 3] are not unit length",),
    ),
    R(
        "vector-auto-layer-unsearched",
        lambda e: [
            "generate",
            e.tiny_recipe(steer=f"  - {{instruction: shout, layer: auto, vector: {e.vector()}}}"),
            "-p",
            "Hi",
        ],
        ("steer[0].layer", "no searched layer", "nsteer search"),
    ),
    R(
        "vector-not-computed-yet",
        lambda e: ["generate", e.tiny_recipe(), "-p", "Hi"],
        ("No vector for 'shout'", "nsteer compute"),
    ),
    R(
        "layer-beyond-the-model",
        lambda e: ["generate", e.tiny_recipe(steer="  - {instruction: shout, layer: 9}"), "--no-steer", "-p", "Hi"],
        ("steer[0].layer", "layer 9 is out of range", "4 layers"),
    ),
    R("export-a-broken-vector", lambda e: ["export", e.file("v.safetensors", "nope")], ("not a readable safetensors",)),
    R(
        "import-not-a-gguf",
        lambda e: ["import", e.file("cv.gguf", "hello"), "--out", str(e.tmp / "o.safetensors")],
        ("is not a GGUF file",),
    ),
    R(
        "import-missing",
        lambda e: ["import", str(e.tmp / "cv.gguf"), "--out", str(e.tmp / "o.safetensors")],
        ("Control vector file not found",),
    ),
    R(
        "export-weight-overflows-float32",
        lambda e: ["export", e.vector(), "--layers", "1", "--weight", "1e39"],
        ("--weight 1e+39 overflows float32",),
    ),
    R(
        "import-claims-a-hundred-million-layers",
        lambda e: ["import", control_vector(e, source={"n_layers": 10**8}), "--out", str(e.tmp / "o.safetensors")],
        ("nsteer.source field n_layers is 100000000, not a layer count",),
    ),
    R(
        "import-layer-name-with-5000-digits",
        lambda e: ["import", control_vector(e, layer="9" * 5000), "--out", str(e.tmp / "o.safetensors")],
        ("is not direction.N with a layer N from 1 to 1023",),
    ),
    R(
        "import-out-exists",
        lambda e: ["import", control_vector(e), "--out", e.vector("mine.safetensors")],
        ("mine.safetensors already exists; pass --force",),
    ),
    R(
        "import-out-a-folder",
        lambda e: ["import", control_vector(e), "--out", str(e.tmp)],
        ("is a folder; give the path of the vector file to write",),
    ),
    R(
        "export-out-exists",
        lambda e: ["export", e.vector(), "--layers", "1", "--weight", "2", "--out", e.file("cv.gguf", "mine")],
        ("cv.gguf already exists; pass --force",),
    ),
    R(
        "vector-nan-in-a-recipe",
        lambda e: [
            "generate",
            e.tiny_recipe(steer=f"  - {{instruction: shout, layer: 1, vector: {e.vector(nan=True)}}}"),
            "-p",
            "Hi",
        ],
        ("holds NaN or infinite values", "recompute"),
    ),
    R(
        "plot-not-png",
        lambda e: ["inspect", e.vector(), "--plot", str(e.tmp / "plot.jpg")],
        ("--plot", "plot.jpg", "ending in .png"),
    ),
    R(
        "plot-layer-out-of-range",
        lambda e: ["inspect", e.vector("a.safetensors"), e.vector("b.safetensors"), "--layer", "9"],
        ("--layer 9 is out of range", "0..3"),
    ),
    R(
        "compare-vectors-of-different-shapes",
        lambda e: [
            "inspect",
            e.vector("a.safetensors"),
            e.vector("b.safetensors", hidden=32),
            "--plot",
            str(e.tmp / "p.png"),
        ],
        ("Only vectors of the same shape can be compared", "width 32", "width 64"),
    ),
    R(
        "centered-with-two-vectors",
        lambda e: ["inspect", e.vector("a.safetensors"), e.vector("b.safetensors"), "--centered"],
        ("Centering needs three or more vectors",),
    ),
    # --- command-line arguments ---------------------------------------------------------------------------------
    R("argument-missing", lambda e: ["compute"], ("Missing argument 'RECIPE'",), usage=True),
    R("command-unknown", lambda e: ["computee", "x.yaml"], ("No such command 'computee'",), usage=True),
    R(
        "option-unknown",
        lambda e: ["generate", "x.yaml", "--temperature", "2"],
        ("No such option: --temperature",),
        usage=True,
    ),
    R(
        "max-new-tokens-zero-flag",
        lambda e: ["generate", e.tiny_recipe(), "--max-new-tokens", "0"],
        ("--max-new-tokens 0:", "greater than 0"),  # the recipe's own rule for generation.max_new_tokens
    ),
    R(
        "max-new-tokens-beyond-the-recipe-cap",
        lambda e: ["generate", e.tiny_recipe(), "--max-new-tokens", "100000"],
        ("--max-new-tokens 100000:", "less than or equal to 8192"),
    ),
    R(
        "max-new-tokens-not-a-number",
        lambda e: ["generate", "x.yaml", "--max-new-tokens", "lots"],
        ("Invalid value for '--max-new-tokens'", "valid integer"),
        usage=True,
    ),
    R(
        "max-new-tokens-over-the-bound-flag",
        lambda e: ["generate", e.tiny_recipe(), "--no-steer", "-p", "Hi", "--max-new-tokens", "9000"],
        ("--max-new-tokens 9000", "less than or equal to 8192"),
    ),
    R(
        "limit-negative",
        lambda e: ["eval", "x.yaml", "--limit", "-4"],
        ("Invalid value for '--limit'", "greater than or equal to 1"),
        usage=True,
    ),
    R(
        "wait-negative",
        lambda e: ["collect", "j", "--wait", "-1"],
        ("Invalid value for '--wait'", "greater than or equal to 0"),
        usage=True,
    ),
    R(
        "export-weight-not-a-number",
        lambda e: ["export", "v.safetensors", "--weight", "strong"],
        ("Invalid value for '--weight'", "valid number"),
        usage=True,
    ),
    R(
        "split-unknown",
        lambda e: ["eval", e.recipe(MINIMAL), "--split", "holdout"],
        ("--split 'holdout' is not a split", "train, validation or test"),
    ),
    R(
        "generate-no-prompt",
        lambda e: ["generate", e.recipe(MINIMAL + "steer:\n  - {instruction: lowercase, layer: 1}\n")],
        ("No prompt given", "--prompt"),
    ),
    R(
        "generate-empty-prompt",
        lambda e: ["generate", e.tiny_recipe(), "--no-steer", "-p", "Hi", "-p", ""],
        ("A prompt is empty",),
    ),
    R(
        "generate-prompt-beyond-the-context",
        lambda e: ["generate", e.tiny_recipe(), "--no-steer", "-p", "Why is the sky blue? " * 100],
        ("The prompt 'Why is the sky blue?", "…", "handles at most 256 positions", "truncate_prompts"),
    ),
    R(
        "generate-new-tokens-beyond-the-context",
        lambda e: ["generate", e.tiny_recipe(), "--no-steer", "-p", "Hi", "--max-new-tokens", "300"],
        ("max_new_tokens 300 leaves no room for a prompt", "at most 256 positions"),
    ),
    R(
        "eval-data-prompt-beyond-the-context",
        lambda e: [
            "eval",
            e.tiny_recipe(steer="  []"),
            "--data",
            e.file("d.jsonl", ifeval_line(prompt="Write it in capitals. " * 100) + "\n"),
        ],
        ("The prompt 'Write it in capitals.", "handles at most 256 positions"),
    ),
    R(
        "compute-base-prompt-beyond-the-context",
        lambda e: [
            e.file("base.jsonl", "".join(json.dumps({"text": f"Tell me more ({i}). " * 60}) + "\n" for i in range(6)))
            and "compute",
            e.recipe(
                'model: {id: "@MODEL@"}\nprompts: {base: base.jsonl}\n'
                "instructions:\n  shout: {phrasings: [Answer in capitals.], check: change_case:english_capital}\n"
                'output: {dir: "@TMP@/out"}\n'
            ),
        ],
        ("The prompt pair of base prompt p0000", "'Tell me more", "handles at most 256 positions", "Shorten that"),
    ),
    R(
        "generate-nothing-to-steer",
        lambda e: ["generate", e.recipe(MINIMAL), "-p", "Hi"],
        ("has no `steer` entries", "--no-steer"),
    ),
    R(
        "compute-no-wait-locally",
        lambda e: ["compute", e.recipe(MINIMAL), "--no-wait"],
        ("--no-wait submits NDIF jobs", "--remote"),
    ),
    R("collect-nothing", lambda e: ["collect"], ("No job to collect", "--all")),
    R(
        "export-unknown-format",
        lambda e: ["export", e.vector(), "--format", "onnx"],
        ("--format 'onnx' is not supported", "llama-cpp"),
    ),
    R(
        "export-layers-not-numbers",
        lambda e: ["export", e.vector(), "--layers", "8,ten"],
        ("--layers '8,ten' is not a comma-separated list",),
    ),
    R("export-layers-repeated", lambda e: ["export", e.vector(), "--layers", "2,2"], ("names a layer twice",)),
    R(
        "list-vectors-folder-missing",
        lambda e: ["list", "--vectors", str(e.tmp / "none")],
        ("No vectors folder at", "--vectors DIR"),
    ),
    R(
        "eval-composition-split-unknown",
        lambda e: ["eval-composition", e.recipe(MINIMAL), "--split", "holdout"],
        ("--split 'holdout' is not a split",),
    ),
    R(
        "search-nothing-to-search",
        lambda e: ["search", e.tiny_recipe(steer=f"  - {{instruction: shout, layer: 1, vector: {e.vector()}}}")],
        ("nothing to search", "layer: auto"),
    ),
    # --- model specs --------------------------------------------------------------------------------------------
    R(
        "model-unknown-hub-id-offline",
        lambda e: ["compute", e.tiny_recipe(model="{id: nsteer-test/no-such-model}")],
        ("Could not load 'nsteer-test/no-such-model'", "not a local directory or file"),
    ),
    R(
        "model-directory-missing",
        lambda e: ["compute", e.tiny_recipe(model="{id: @TMP@/models/missing}")],
        ("field model.id", "models/missing' names no file or folder"),
    ),
    R(
        "model-relative-directory-missing",
        lambda e: ["compute", e.tiny_recipe(model="{id: ./no/such/dir}")],
        ("field model.id", "'./no/such/dir' names no file or folder", "resolved from"),
    ),
    R(
        "model-directory-empty",
        lambda e: [(e.tmp / "empty-model").mkdir() or "compute", e.tiny_recipe(model="{id: @TMP@/empty-model}")],
        ("empty-model' is a folder without a config.json", "save_pretrained"),
    ),
    R(
        "model-directory-config-only",
        lambda e: [
            e.file("cfg-only/config.json", json.dumps({"model_type": "llama", "hidden_size": 8})) and "compute",
            e.tiny_recipe(model="{id: @TMP@/cfg-only}"),
        ],
        ("cfg-only' could not be loaded as a causal language model", "hidden size"),
    ),
    R(
        "model-gguf-not-a-model",
        lambda e: [
            e.file("fake.gguf", b"GGUF" + os.urandom(64)) and "compute",
            e.tiny_recipe(model="{id: @TMP@/fake.gguf}"),
        ],
        ("fake.gguf",),
    ),
    R(
        "model-gguf-text-file",
        lambda e: [
            e.file("notes.gguf", "these are my notes") and "compute",
            e.tiny_recipe(model="{id: @TMP@/notes.gguf}"),
        ],
        ("notes.gguf",),
    ),
    R(
        "model-home-unknown",
        lambda e: ["compute", e.tiny_recipe(model="{id: ~nosuchuser_nsteer/model}")],
        ("~nosuchuser_nsteer/model",),
    ),
    R(
        "output-dir-is-a-file",
        lambda e: ["compute", e.tiny_recipe(output=f"{{dir: {e.file('taken', 'a file')}}}")],
        ("output folder", "taken is a file", "a file stands where a folder is needed"),
    ),
    R(
        "model-gguf-is-a-folder",
        lambda e: [(e.tmp / "m.gguf").mkdir() or "compute", e.tiny_recipe(model="{id: @TMP@/m.gguf}")],
        ("m.gguf is a folder, not a GGUF file",),
    ),
    R(
        "output-dir-unwritable",
        lambda e: ["compute", e.tiny_recipe(output="{dir: /proc/nsteer-cannot-write-here}")],
        ("The output folder /proc/nsteer-cannot-write-here cannot be written",),
    ),
    R(
        "eval-out-unwritable",
        lambda e: ["eval", e.tiny_recipe(steer="  []"), "--out", "/proc/nsteer-cannot-write-here"],
        ("The output folder /proc/nsteer-cannot-write-here cannot be written",),
    ),
    R(
        "search-out-is-a-file",
        lambda e: [
            "search",
            e.tiny_recipe(steer=f"  - {{instruction: shout, vector: {e.vector()}}}"),
            "--out",
            e.file("taken", "x"),
        ],
        ("taken is a file",),
    ),
    R(
        "import-out-unwritable",
        lambda e: ["import", control_vector(e), "--out", "/proc/nsteer-cannot-write-here/v.safetensors"],
        ("cannot be written",),
    ),
    R(
        "plot-into-a-folder",
        lambda e: [(e.tmp / "p.png").mkdir() or "inspect", e.vector(), "--plot", str(e.tmp / "p.png")],
        ("p.png is a folder; give the path of the plot to write",),
    ),
    R(
        "model-gguf-missing",
        lambda e: ["compute", e.tiny_recipe(model="{id: @TMP@/gone.gguf}")],
        ("field model.id", "gone.gguf' names no file or folder"),
    ),
    R(
        "model-cuda-without-gpu",
        lambda e: ["compute", e.tiny_recipe(model='{id: "@MODEL@", device: cuda}')],
        ("device 'cuda'", "no CUDA GPU", "device: cpu"),
    ),
    R(
        "model-layers-path-wrong",
        lambda e: ["compute", e.tiny_recipe(model='{id: "@MODEL@", layers_path: model.blocks}')],
        ("layers_path 'model.blocks' does not exist",),
    ),
    R(
        "model-layers-path-not-a-list",
        lambda e: ["compute", e.tiny_recipe(model='{id: "@MODEL@", layers_path: model.norm}')],
        ("layers_path 'model.norm'", "not a list of decoder blocks"),
    ),
    R(
        "ndif-with-a-local-model",
        lambda e: ["compute", e.tiny_recipe(model='{id: "@MODEL@", backend: ndif}')],
        ("is a local model", "backend: local"),
    ),
    R(
        "remote-flag-with-a-local-model",
        lambda e: ["compute", e.tiny_recipe(), "--remote"],
        ("is a local model", "Hub id"),
    ),
    R(
        "collect-unknown-job",
        lambda e: ["collect", "no-such-job"],
        ("could not be collected", "no-such-job"),
        env={"NSTEER_JOBS_DIR": "jobs"},
    ),
    R(
        "collect-a-damaged-job-record",
        lambda e: [e.file("jobs/j1.json", '{"id": "j1", "kind": "vec') and "collect", "j1"],
        ("j1.json is damaged (not valid JSON", "could not be collected"),
        env={"NSTEER_JOBS_DIR": "jobs"},
    ),
    R(
        "collect-a-job-record-naming-another-host",
        lambda e: [e.file("jobs/j2.json", job_record("j2", host="http://collector.invalid")) and "collect", "j2"],
        ("was submitted to http://collector.invalid", "The API key is sent only to the configured host"),
        env={"NSTEER_JOBS_DIR": "jobs", "NDIF_API_KEY": "k-123456"},
    ),
    R(
        "ndif-without-an-api-key",
        lambda e: ["compute", e.tiny_recipe(model="{id: meta-llama/Llama-3.1-8B-Instruct, backend: ndif}")],
        ("No NDIF API key found", "NDIF_API_KEY"),
        env={"NDIF_API_KEY": None},
    ),
]

# Rows also run through the installed executable in a fresh process (slower: each imports torch and nnsight).
SUBPROCESS_ROWS = ("unknown-model-key", "vector-truncated", "max-new-tokens-not-a-number")


# -------------------------------------------------------------------------------------------------------- runner


def flat(text: str) -> str:
    return " ".join(text.split())


def check_message(row: Row, code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, f"{row.id}: a traceback reached the user:\n{err}"
    assert code == row.code, f"{row.id}: exit code {code}, expected {row.code}\nstdout: {out}\nstderr: {err}"
    if row.usage:  # usage, a hint, then the error (every nsteer error reads "error: ...")
        assert "Usage:" in err and "--help" in err and "error:" in err, err
        message = flat(err)
    else:
        assert "error:" in err, f"{row.id}: no 'error:' line in\n{err}"
        text = err[err.index("error:") :].strip()  # "Opening MODEL ..." may come before it
        assert "\n\n" not in text, f"{row.id}: the message is not one paragraph:\n{text}"
        message = flat(text)
    for fragment in row.fragments:
        assert fragment in message, f"{row.id}: {fragment!r} not in the message:\n{message}"


def run_in_process(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["nsteer", *argv])
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich must not wrap the message mid-word
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the point of the matrix: nothing else may escape main()
        pytest.fail(f"uncaught exception escaped nsteer.cli.main():\n{traceback.format_exc()}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def apply_env(monkeypatch, row: Row) -> None:
    for name, value in row.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if "NDIF_API_KEY" in row.env:
        from nnsight import CONFIG

        monkeypatch.setattr(CONFIG.API, "APIKEY", row.env["NDIF_API_KEY"])


@pytest.fixture()
def env(tiny_model, tmp_path, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)  # relative paths (./no/such/dir, runs/...) land in the row's own folder
    directory, handle = tiny_model
    return Env(tmp_path, directory, handle)


def test_the_matrix_is_large_and_ids_are_unique() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    assert len(ROWS) >= 40
    assert set(SUBPROCESS_ROWS) <= set(ids)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, env: Env, monkeypatch, capsys) -> None:
    apply_env(monkeypatch, row)
    argv = row.build(env)
    check_message(row, *run_in_process(monkeypatch, capsys, argv))


def test_bad_inputs_through_the_executable(env: Env) -> None:
    """A few rows in fresh processes, through the installed console script (started together: each imports torch)."""
    command = [str(NSTEER)] if NSTEER.exists() else [sys.executable, "-m", "nsteer.cli"]
    environment = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = []
    for row_id in SUBPROCESS_ROWS:
        row = next(row for row in ROWS if row.id == row_id)
        folder = env.tmp / row_id
        folder.mkdir()
        argv = row.build(Env(folder, env.model_dir, env.handle))
        process = subprocess.Popen(
            [*command, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=folder
        )
        started.append((row, process))
    for row, process in started:
        out, err = process.communicate(timeout=240)
        check_message(row, process.returncode, out, err)
