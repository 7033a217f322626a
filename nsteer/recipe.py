"""Recipes: pydantic models of the YAML, and loading with errors that name the file, the line and the field."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nsteer.constants import EMBEDDED_ID
from nsteer.errors import NsteerError, RecipeError, require
from nsteer.evaluate.checkers import CheckSpec, validate_spec
from nsteer.evaluate.custom_checks import function_check, regex_check
from nsteer.fileio import MAX_RECIPE_BYTES, YAMLLimitError, input_path, is_file, parse_yaml, read_text, user_path
from nsteer.limits import LARGEST_FINITE, MAX_BATCH_SIZE, MAX_CLAMP, MAX_NEW_TOKENS, MAX_SEED
from nsteer.prompts import builtin_instruction, load_base_prompts, load_phrasings


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values keep their type, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSection(Strict):
    """Which model to open and how."""

    id: str = Field(
        EMBEDDED_ID,
        description="embedded:smollm2-135m-instruct, a local directory or .gguf file (relative to the recipe's "
        "folder), or a Hub id.",
    )
    backend: Literal["local", "ndif"] = Field("local", description="local runs here; ndif runs on the NDIF service.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations dtype; auto: bfloat16 on a GPU that supports it, else float32."
    )
    device: str = Field(
        "cpu", pattern=r"^(cpu|auto|cuda(:\d{1,4})?)$", description="cpu, cuda, cuda:N or auto (a GPU if there is one)."
    )
    layers_path: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*$",
        max_length=200,
        description="Dotted path of the decoder-block list, for unusual models (attribute names, e.g. model.layers).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    timeout: float = Field(900.0, gt=0, description="Seconds to wait for one NDIF request before giving up.")


class SplitSection(Strict):
    """Fractions of base prompts (and phrasings) for each split."""

    train: float = Field(0.6, ge=0, le=1, description="Share used to compute vectors (must be positive).")
    validation: float = Field(0.2, ge=0, le=1, description="Share `nsteer search` scores settings on.")
    test: float = Field(0.2, ge=0, le=1, description="Share `nsteer eval` reports on; never seen by compute or search.")

    @model_validator(mode="after")
    def _sums(self) -> SplitSection:
        """The train fraction is positive, and the three fractions sum to at most 1."""
        if self.train <= 0:
            raise ValueError("the train fraction must be positive")
        if self.train + self.validation + self.test > 1.0 + 1e-9:
            raise ValueError("train + validation + test must not exceed 1")
        return self


class PromptsSection(Strict):
    """Base prompts and how they are split."""

    base: str = Field("builtin:base-v1", description="builtin:base-v1 or a JSONL / JSON / YAML file of requests.")
    split: SplitSection = Field(
        SplitSection(), description="Train / validation / test fractions; they may sum to less than 1."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for the splits and the pairing of prompts with phrasings."
    )
    max_pairs: int | None = Field(None, gt=0, description="Use at most this many training pairs per instruction.")


class CheckSection(Strict):
    """How an answer is judged: an IFEval checker with its arguments, or your own regular expression or function.

    A function is code the recipe runs: see docs/quickstart.md ("When IFEval has no check for your instruction").
    """

    id: str | None = Field(None, description="IFEval instruction id, e.g. change_case:english_lowercase.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="The IFEval checker's keyword arguments.")
    regex: str | None = Field(
        None, description="Instead of id: the answer passes when this regular expression matches."
    )
    function: str | None = Field(
        None,
        description="Instead of id: module:name of a Python function answer -> bool; module.py in the recipe's folder, "
        "else an importable module.",
    )
    loose: str | None = Field(
        None,
        description="With regex or function: another one for the loose score; default: the check on IFEval's loose "
        "variants of the answer.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> CheckSection:
        """Exactly one of id, regex and function; kwargs go with id, loose with regex or function."""
        given = [name for name in ("id", "regex", "function") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of id (an IFEval check), regex or function"
                + (f", not {' and '.join(given)}" if given else "")
            )
        if self.kwargs and self.id is None:
            raise ValueError("kwargs are the arguments of an IFEval check (id); a regex or function takes none")
        if self.loose is not None and self.id is not None:
            raise ValueError("loose goes with regex or function; an IFEval check has its own loose scoring")
        return self


class InstructionSection(Strict):
    """One instruction: phrasings and the check that judges it; built-in names need nothing else."""

    phrasings: str | list[str] | None = Field(
        None, description="builtin:<name>, a list of phrasings, or a file; default builtin:<instruction name>."
    )
    check: CheckSection | str | None = Field(
        None, description="{id, kwargs} or an IFEval id; default: the built-in one."
    )
    category: str | None = Field(None, description="format, language, length or words (informational).")

    @field_validator("phrasings")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        """A list of phrasings is non-empty and holds no empty phrasing."""
        if isinstance(value, list) and (not value or not all(isinstance(p, str) and p.strip() for p in value)):
            raise ValueError("phrasings must be a non-empty list of non-empty strings")
        return value


class RelativeWeight(Strict):
    """A weight on the vector's own scale: ``k`` times the layer's raw norm ``‖u_l‖`` (the mean difference's length)."""

    relative: float = Field(description="k: the weight is k × ‖u_l‖ at the edit's layer.")

    @field_validator("relative")
    @classmethod
    def _finite(cls, value: float) -> float:
        """k is a finite number."""
        if not math.isfinite(value):
            raise ValueError("relative must be a finite number")
        return value


class SteerEntry(Strict):
    """One edit: an instruction's vector at a layer, with a mode, a weight and positions."""

    instruction: str = Field(description="A key of `instructions`.")
    layer: int | Literal["auto"] = Field(
        "auto",
        description="Layer index, or auto for the searched setting: its layer, and its mode, weight, positions and "
        "options (block, gate, clamp, skip_first, direction) where the entry gives none; an entry giving another is "
        "refused.",
    )
    mode: Literal["set", "add", "ablate"] = Field(
        "set", description="set the projection, add the direction, or ablate it."
    )
    weight: float | RelativeWeight = Field(
        1.0,
        description="Scales the edit: a number, or {relative: k} for k × ‖u_l‖ at the layer (an add of k = 1 moves the "
        "stream as far as the instruction does on average); negative add steers away (e.g. word exclusion).",
    )
    positions: Literal["all", "prompt", "generated"] = Field("all", description="Which token positions are edited.")
    vector: str | None = Field(
        None,
        description="A vector file, or another instruction of the recipe whose vector to use "
        "(word exclusion: the include:<word> vector with a negative add weight).",
    )
    target_scale: float = Field(
        1.0, description="set only: the target projection is target_scale × z_l (1: the paper's set)."
    )
    block: int = Field(
        1,
        ge=1,
        le=1024,
        description="Apply the edit at this many consecutive layers from `layer`, the weight split evenly among them.",
    )
    gate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="m: steer a prompt only when its last token's projection at the layer is below z_l − m × ‖u_l‖ "
        "(0.5: midway between the training means with and without the instruction), decided once per prompt.",
    )
    clamp: float | None = Field(
        None,
        ge=-MAX_CLAMP,
        le=MAX_CLAMP,
        description="c: the edit never lifts the projection above z_l + c × ‖u_l‖ (0: the mean with it).",
    )
    skip_first: bool = Field(
        False, description="Leave each prompt's first token (the attention sink, with huge states) unedited."
    )
    direction: Literal["own", "centered"] = Field(
        "own",
        description="own: the vector's direction; centered: u_l minus the mean vector of the recipe's instructions "
        "(what this instruction does that the others do not; add or ablate only, 3+ instructions).",
    )

    @field_validator("layer")
    @classmethod
    def _layer_non_negative(cls, value: Any) -> Any:
        """A layer number is 0 or more (and below the model's layer count, checked when the model is opened)."""
        if isinstance(value, int) and value < 0:
            raise ValueError("layer must be 0 or more (or auto)")
        return value

    @field_validator("weight", "target_scale", "gate", "clamp")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        """The weight and the target scale are finite numbers."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{info.field_name} must be a finite number")
        return value

    @model_validator(mode="after")
    def _target_scale_is_for_set(self) -> SteerEntry:
        """A target scale other than 1 needs mode set (add and ablate have no target)."""
        if self.target_scale != 1.0 and self.mode != "set":
            raise ValueError(f"target_scale applies to mode set only, not {self.mode}")
        if self.direction == "centered" and (self.mode == "set" or self.clamp is not None):
            raise ValueError(
                "a centered direction has no mean projection of its own: use it with mode add or ablate, without clamp"
            )
        return self


class ExtractionSection(Strict):
    """How vectors are computed."""

    batch_size: int = Field(
        16,
        gt=0,
        le=MAX_BATCH_SIZE,
        description="Prompts per forward pass; a pair is two prompts, so at least one pair (2 prompts) goes per pass.",
    )


class GenerationSection(Strict):
    """How answers are decoded."""

    max_new_tokens: int = Field(64, gt=0, le=MAX_NEW_TOKENS, description="Tokens generated per answer (at most).")
    batch_size: int = Field(
        32,
        gt=0,
        le=MAX_BATCH_SIZE,
        description="Prompts per batched generation (the search fills its batches with the rows of every candidate).",
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for sampling, so sampled answers repeat.")
    truncate_prompts: bool = Field(
        False,
        description="Cut the beginning of a prompt too long for the model's context with max_new_tokens "
        "(its end is kept); by default such a prompt is refused before anything is generated.",
    )


class SearchWeights(Strict):
    """Search weights on the vector's own scale: each k is tried as k × ‖u_l‖ at every candidate layer."""

    relative: list[float] = Field(
        min_length=1, description="The ks: 1 moves the stream as far as the instruction does on average."
    )


class SearchSection(Strict):
    """How `nsteer search` sweeps layers (and weights for add) on the validation split, and its quality guard."""

    layers: list[int] | None = Field(
        None, description="Candidate layers; default n_layers // 5 to the last, every layer_step."
    )
    layer_step: int = Field(2, gt=0, description="Step of the default layer range.")
    weights: list[float] | SearchWeights = Field(
        default_factory=lambda: SearchWeights(relative=[0.5, 1.0, 2.0]),
        description="Candidate weights for add entries that give no weight of their own: {relative: [k, ...]} for "
        "k × ‖u_l‖ at each candidate layer, or a list of plain numbers (the same at every layer).",
    )
    modes: list[Literal["set", "add", "ablate"]] | None = Field(
        None,
        min_length=1,
        description="Modes to sweep for every searched entry, each with its own weights; default: the entry's mode.",
    )
    target_scales: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Candidate target scales k for set entries (target k × z_l); [1.0] is the paper's set.",
    )
    condition: Literal["absent", "present", "both"] = Field(
        "absent", description="Score with the instruction absent from the prompt, present, or both."
    )
    max_prompts: int | None = Field(32, gt=0, description="Validation prompts per instruction (per condition).")
    max_new_tokens: int | None = Field(
        None, gt=0, le=MAX_NEW_TOKENS, description="Override generation.max_new_tokens for the sweep."
    )
    halving: bool = Field(
        False,
        description="Successive halving: score every setting on the first halving_start prompt pairs, keep the "
        "better half, double the pairs, and so on; the survivors are judged on every pair.",
    )
    halving_start: int = Field(4, gt=0, description="Prompt pairs of the first halving round.")
    margin: float = Field(
        0.1, ge=0, le=1, description="Reject a setting whose degenerate share exceeds the baseline's by more."
    )
    min_perplexity_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Reject a setting whose median perplexity is below this fraction of the baseline's (0: off).",
    )

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: Any) -> Any:
        """Search layers, when given, are a non-empty list of layer numbers, 0 or more."""
        if value is not None and (not value or any(layer < 0 for layer in value)):
            raise ValueError("layers must be a non-empty list of layer indices, 0 or more")
        return value

    @field_validator("weights", "target_scales")
    @classmethod
    def _weights_finite(cls, value: Any, info: ValidationInfo) -> Any:
        """Search weights and target scales are non-empty lists of finite numbers."""
        numbers = value.relative if isinstance(value, SearchWeights) else value
        if not numbers:
            raise ValueError(f"{info.field_name} must list at least 1 number")
        if not all(math.isfinite(number) for number in numbers):
            raise ValueError(f"{info.field_name} must be finite numbers")
        return value


class EvaluationSection(Strict):
    """How `nsteer eval` scores the recipe."""

    reference_model: str | None = Field(
        None, description="Model whose perplexity judges answers; default: the recipe's model when local, none on NDIF."
    )
    max_prompts: int | None = Field(None, gt=0, description="Test prompts per instruction (--limit overrides).")


class OutputSection(Strict):
    """Where vectors and reports go."""

    dir: str = Field(
        "runs/{name}", description="Output folder, relative to the current directory; {name} is the recipe name."
    )


class Recipe(Strict):
    """A whole recipe: model, prompts, instructions, edits, and run settings."""

    name: str = Field(
        "recipe",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        max_length=100,
        description="Names the output folder: letters, digits, _ . - (not starting with . or -), at most 100.",
    )
    model: ModelSection = Field(ModelSection(), description="The model to steer.")
    prompts: PromptsSection = Field(PromptsSection(), description="Base prompts, splits and seed.")
    instructions: dict[str, InstructionSection] = Field(
        min_length=1,
        description="One entry per instruction, by name: a built-in name, or your own with phrasings and a check.",
    )
    steer: list[SteerEntry] = Field(
        default_factory=list, description="The edits `generate`, `search` and `eval` apply, in order."
    )
    transfer: bool = Field(False, description="Allow vectors computed on another model of the same shape.")
    extraction: ExtractionSection = Field(ExtractionSection(), description="How vectors are computed.")
    generation: GenerationSection = Field(GenerationSection(), description="How answers are decoded.")
    output: OutputSection = Field(OutputSection(), description="Where vectors and reports are written.")
    search: SearchSection = Field(SearchSection(), description="The layer / weight sweep of `nsteer search`.")
    evaluation: EvaluationSection = Field(EvaluationSection(), description="The 2x2 table of `nsteer eval`.")
    demo_prompts: list[str] = Field(default_factory=list, description="Prompts `nsteer generate --compare` shows.")

    @field_validator("demo_prompts")
    @classmethod
    def _prompts_not_blank(cls, value: list[str]) -> list[str]:
        """Demo prompts are not empty or blank."""
        if any(not prompt.strip() for prompt in value):
            raise ValueError("demo_prompts must not hold an empty prompt")
        return value

    _source: Path | None = PrivateAttr(None)
    _lines: Mapping[tuple, int] = PrivateAttr(default_factory=dict)
    _origins: Mapping[tuple, str] = PrivateAttr(default_factory=dict)  # fields set from outside the file, by whom
    _custom_checks: dict[str, Any] = PrivateAttr(default_factory=dict)  # instruction -> CustomCheck, built at load

    @model_validator(mode="after")
    def _steer_names_instructions(self) -> Recipe:
        """Every steer entry names one of the recipe's instructions."""
        for index, entry in enumerate(self.steer):
            if entry.instruction not in self.instructions:
                raise _FieldProblem(
                    ("steer", index, "instruction"),
                    f"'{entry.instruction}' is not one of the recipe's instructions ({', '.join(self.instructions)}).",
                )
        return self

    @model_validator(mode="after")
    def _one_file_per_instruction(self) -> Recipe:
        """No two instructions share a vector file name ("a b" and "a-b" both write a-b.safetensors; case counts
        as the same on some file systems), so one instruction's vector never replaces another's."""
        seen: dict[str, str] = {}
        for name in self.instructions:
            if not name.strip():
                raise _FieldProblem(("instructions",), "an instruction name is empty.")
            file = vector_file_name(name).casefold()
            if file in seen:
                raise _FieldProblem(
                    ("instructions", name),
                    f"'{name}' and '{seen[file]}' would both write the vector file {vector_file_name(name)}: "
                    "rename one of them.",
                )
            seen[file] = name
        return self

    @model_validator(mode="after")
    def _weights_fit_the_dtype(self) -> Recipe:
        """Absolute weights stay finite in the model's dtype (1e308 would turn float32 activations into inf)."""
        largest = LARGEST_FINITE[self.model.dtype]
        named = self.model.dtype if self.model.dtype != "auto" else "dtype (auto opens bfloat16 or float32)"
        for index, entry in enumerate(self.steer):
            if isinstance(entry.weight, float) and abs(entry.weight) > largest:
                raise _FieldProblem(
                    ("steer", index, "weight"),
                    f"{entry.weight:g} overflows the model's {named} (largest {largest:.4g}).",
                )
        weights = self.search.weights if isinstance(self.search.weights, list) else []
        if any(abs(weight) > largest for weight in weights):
            raise _FieldProblem(
                ("search", "weights"), f"a weight overflows the model's {named} (largest {largest:.4g})."
            )
        return self

    @property
    def source(self) -> Path | None:
        """The file the recipe was loaded from (None for a recipe given as a dict)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are resolved from."""
        return self._source.parent if self._source else Path.cwd()

    @property
    def output_dir(self) -> Path:
        """The output folder (relative to the current directory, unlike input files, which follow the recipe)."""
        return user_path(self.output.dir.replace("{name}", self.name))

    @property
    def model_location(self) -> str:
        """``model.id`` as it is opened: a relative path resolved from the recipe's folder, else the id as written.

        A path is an id that names something existing there, or one that is written as a path (``/``, ``./``,
        ``../``, ``~`` or a ``.gguf`` file); anything else is a Hub id (or the embedded model).
        """
        return model_location(self.model.id, self.base_dir)

    def custom_check(self, name: str) -> Any:
        """Instruction ``name``'s CustomCheck when its check is a regex or a function (built at load), else None."""
        return self._custom_checks.get(name)

    def error(self, location: tuple, message: str) -> RecipeError:
        """A RecipeError pointing at ``location`` (e.g. ``("steer", 0, "layer")``) in the recipe's file."""
        return RecipeError(self.problem(location, message))

    def problem(self, location: tuple, message: str) -> str:
        """One line naming where ``location`` was written (file, line and field, or the option that set it)."""
        return _format_problem(self._source, self._lines, self._origins, location, message)

    def check_layers(self, n_layers: int) -> None:
        """Refuse steer entries (and search layers) that do not exist in a model with ``n_layers`` blocks."""
        problems = [
            self.problem(
                ("steer", index, "layer"),
                f"layer {entry.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}), "
                "or use auto.",
            )
            for index, entry in enumerate(self.steer)
            if isinstance(entry.layer, int) and entry.layer >= n_layers
        ]
        problems += [
            self.problem(
                ("steer", index, "block"),
                f"a block of {entry.block} layers from layer {entry.layer} ends past the model's last layer "
                f"{n_layers - 1}: start it at layer {n_layers - entry.block} or earlier, or make it shorter.",
            )
            if entry.block <= n_layers
            else self.problem(
                ("steer", index, "block"), f"block {entry.block} is longer than the model's {n_layers} layers."
            )
            for index, entry in enumerate(self.steer)
            if entry.block > n_layers
            or isinstance(entry.layer, int)
            and entry.layer < n_layers <= entry.layer + entry.block - 1
        ]
        problems += [
            self.problem(
                ("search", "layers"),
                f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}).",
            )
            for layer in self.search.layers or ()
            if layer >= n_layers
        ]
        if problems:
            raise RecipeError(*problems)


def vector_file_name(instruction: str) -> str:
    """The file name ``compute`` gives the vector of ``instruction`` in the output folder."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", instruction) + ".safetensors"


class _FieldProblem(ValueError):
    """A cross-field problem that knows which field it belongs to."""

    def __init__(self, location: tuple, message: str) -> None:
        super().__init__(message)
        self.location = location


def _line_map(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its (1-based) line."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            below = _line_map(value_node, child)
            below[child] = key_node.start_mark.line + 1  # a field is named on its key's line
            lines.update(below)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, path + (index,)))
    return lines


def _dotted(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format(source: Path | None, lines: Mapping[tuple, int], location: tuple, message: str) -> str:
    where = str(source) if source else "recipe"
    probe = tuple(location)
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    place = f"{where}, line {line}" if line else where
    return f"{place}, field {_dotted(tuple(location))}: {message}"


def _data_location(data: Any, location: tuple, kind: str) -> tuple:
    """Keep the parts of a pydantic error location that exist in the data (dropping union-branch tags)."""
    kept: list = []
    node = data
    for index, part in enumerate(location):
        if isinstance(node, dict) and part in node:
            kept.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
        elif index == len(location) - 1 and kind == "missing":
            kept.append(part)  # a missing field is not in the data, but it is the field to name
    return tuple(kept)


def _pydantic_message(error: Mapping[str, Any], data: Any) -> tuple[tuple, str]:
    kind = error["type"]
    location = _data_location(data, tuple(error["loc"]), kind)
    if kind == "extra_forbidden":
        parent = location[:-1]
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (
            location,
            f"unknown key '{location[-1]}'. Allowed here: {', '.join(allowed)}.{hint}"
            if allowed
            else f"unknown key '{location[-1]}'.",
        )
    if kind == "missing":
        return location, "this field is required."
    message = error["msg"].removeprefix("Value error, ")
    if kind == "model_type":  # name the keys, not pydantic's class
        message = f"Input should be a mapping with the key(s) {', '.join(_allowed_keys(location))}"
    if "input" in error and kind not in ("value_error",):
        message += f" (got {error['input']!r})"
    return location, message + "."


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSection,
    "prompts": PromptsSection,
    "split": SplitSection,
    "generation": GenerationSection,
    "extraction": ExtractionSection,
    "output": OutputSection,
    "check": CheckSection,
    "search": SearchSection,
    "evaluation": EvaluationSection,
}


def _allowed_keys(parent: tuple) -> list[str]:
    if not parent:
        return list(Recipe.model_fields)
    if parent[0] == "steer":
        return list(RelativeWeight.model_fields if parent[-1] == "weight" else SteerEntry.model_fields)
    if parent[-2:] == ("search", "weights"):
        return list(SearchWeights.model_fields)
    if parent[0] == "instructions" and len(parent) == 2:
        return list(InstructionSection.model_fields)
    section = _SECTIONS.get(str(parent[-1]))
    return list(section.model_fields) if section else []


def recipe_from_dict(data: Any, *, source: Path | None = None, lines: Mapping[tuple, int] | None = None) -> Recipe:
    """Validate a recipe given as a dict (the SDK path); errors are one RecipeError naming every problem's field."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError(
            _format(source, lines, (), f"a recipe must be a mapping of sections, got {type(data).__name__}.")
        )
    recipe = _validated(data, source, lines, {})
    _check_references(recipe)
    return recipe


def _validated(data: dict, source: Path | None, lines: Mapping[tuple, int], origins: Mapping[tuple, str]) -> Recipe:
    """``Recipe.model_validate`` with every problem reported at once; ``origins`` names fields set from outside."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems = _validation_problems(error, data)
        # dict.fromkeys: one override that set several steer entries is one problem, not one per entry
        raise RecipeError(
            *dict.fromkeys(_format_problem(source, lines, origins, location, message) for location, message in problems)
        ) from None
    recipe._source = source
    recipe._lines = dict(lines)
    recipe._origins = dict(origins)
    return recipe


def _validation_problems(error: ValidationError, data: Any) -> list[tuple[tuple, str]]:
    """One (location, message) per field pydantic refused, in document order of first mention."""
    # A mistyped key (instruction: for instructions:) also makes a field missing: name the typo first.
    raw = sorted(error.errors(), key=lambda problem: problem["type"] == "missing")
    found: dict[tuple, list[str]] = {}
    kinds: dict[tuple, str] = {}
    for problem in raw:
        context = problem.get("ctx", {}).get("error")
        if isinstance(context, _FieldProblem):
            location, message = context.location, str(context)
        else:
            location, message = _pydantic_message(problem, data)
        # A union field (e.g. layer: int | "auto") fails once per branch: say all branches in one sentence.
        found.setdefault(location, []).append(message)
        kinds.setdefault(location, problem["type"])
    # A mapping given to a "number or mapping" field (weight: {relative: ...}) fails as "not a number" and again for
    # what is wrong inside the mapping: report the problem inside.
    deeper = {location for location in found if location and kinds[location] != "missing"}
    return [
        (location, messages[0] if len(messages) == 1 else "; or ".join(m.rstrip(".") for m in messages) + ".")
        for location, messages in found.items()
        if not any(inner[: len(location)] == location and len(inner) > len(location) for inner in deeper)
    ]


def _format_problem(
    source: Path | None,
    lines: Mapping[tuple, int],
    origins: Mapping[tuple, str],
    location: tuple,
    message: str,
) -> str:
    """A problem in the file (file, line, field), or in a value given from outside (the option that gave it)."""
    origin = next((origins[at] for at in _prefixes(location) if at in origins), None)
    if origin is None:
        return _format(source, lines, location, message)
    return f"{origin}: {message}"


def _prefixes(location: tuple) -> list[tuple]:
    return [location[:end] for end in range(len(location), 0, -1)]


@dataclass(frozen=True)
class Override:
    """One recipe field set from outside the recipe file, e.g. by a command-line option.

    ``path`` walks the recipe as its YAML does: ``("model", "id")``, ``("prompts", "seed")``. In ``steer`` the
    second part picks entries: ``None`` every entry, an int one entry, a str the entries steering that instruction:
    ``("steer", None, "layer")``, ``("steer", "lowercase", "weight")``. ``origin`` names who set it in messages
    (``--layer 99``).
    """

    path: tuple
    value: Any
    origin: str


def override_recipe(recipe: Recipe, overrides: Sequence[Override]) -> Recipe:
    """``recipe`` with fields replaced, validated by the same models and checks as the file itself.

    A value an override sets is refused with the same message the file would get, naming the override's origin
    instead of a line: ``--dtype float64: Input should be 'float32', 'bfloat16' or 'float16'``.
    """
    if not overrides:
        return recipe
    data = recipe.model_dump(exclude_unset=True)
    origins = dict(recipe._origins)
    problems = []
    for override in overrides:
        try:
            for location in _override_locations(data, override.path):
                _set(data, location, override.value)
                origins[location] = override.origin
        except _FieldProblem as problem:
            problems.append(f"{override.origin}: {problem}")
    try:
        changed = _validated(data, recipe._source, recipe._lines, origins)
        _check_references(changed)
    except RecipeError as error:
        raise RecipeError(*problems, *error.problems) from None
    if problems:
        raise RecipeError(*problems)
    return changed


def _override_locations(data: dict, path: tuple) -> list[tuple]:
    """The concrete field locations an override path names (several for ``steer`` entries chosen by instruction)."""
    if not path or path[0] != "steer":
        return [tuple(path)]
    entries = data.get("steer") or []
    if not entries:
        raise _FieldProblem(path, "the recipe has no steer entries to change; add one to the recipe.")
    selector, rest = path[1], tuple(path[2:])
    if selector is None:
        return [("steer", index, *rest) for index in range(len(entries))]
    if isinstance(selector, int):
        if not 0 <= selector < len(entries):
            raise _FieldProblem(path, f"the recipe has {len(entries)} steer entries, numbered 0..{len(entries) - 1}.")
        return [("steer", selector, *rest)]
    chosen = [index for index, entry in enumerate(entries) if entry.get("instruction") == selector]
    if not chosen:
        steered = ", ".join(dict.fromkeys(str(entry.get("instruction")) for entry in entries))
        raise _FieldProblem(path, f"no steer entry steers '{selector}' (the entries steer: {steered}).")
    return [("steer", index, *rest) for index in chosen]


def _set(data: dict, location: tuple, value: Any) -> None:
    """Set ``data[location[0]][location[1]]... = value``, creating sections on the way."""
    node: Any = data
    for part in location[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    node[location[-1]] = value


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a YAML recipe file."""
    require(path, (str, os.PathLike), "path", "Give the path of a .yaml recipe.")
    path = Path(path)
    hint = "Give the path to a .yaml recipe (see recipes/)."
    text = read_text(path, "recipe file", RecipeError, limit=MAX_RECIPE_BYTES, hint=hint)
    try:
        data, node = parse_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        advice = "" if isinstance(error, YAMLLimitError) else " Check indentation, colons and quotes."
        raise RecipeError(f"{where}: invalid YAML ({problem}).{advice}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty. It needs at least an `instructions` section.")
    duplicate = _duplicate_key(node)
    if duplicate is not None:  # YAML itself would silently keep only the last one
        location, line, first_line = duplicate
        raise RecipeError(
            f"{path}, line {line}, field {_dotted(location)}: the key '{location[-1]}' appears twice "
            f"(first on line {first_line}); merge the two into one."
        )
    return recipe_from_dict(data, source=path, lines=_line_map(node) if node is not None else {})


def _duplicate_key(node: yaml.Node | None, path: tuple = ()) -> tuple[tuple, int, int] | None:
    """The first key that appears twice in one mapping: (key path, its line, the line it first appeared on)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in seen and key != "<<":
                return path + (key,), line, seen[key]
            seen[key] = line
            found = _duplicate_key(value_node, path + (key,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, path + (index,))
            if found:
                return found
    return None


def _check_references(recipe: Recipe) -> None:
    """Check that the model path, files, built-in names and checkers the recipe refers to exist, before any model
    is loaded; every problem found is reported at once."""
    problems: list[str] = []

    def refuse(location: tuple, message: str) -> None:
        problems.append(recipe.problem(location, message))

    model_problem = _model_path_problem(recipe)
    if model_problem:
        refuse(("model", "id"), model_problem)
    try:
        load_base_prompts(recipe.prompts.base, recipe.base_dir)
    except NsteerError as error:
        refuse(("prompts", "base"), str(error))
    for name, section in recipe.instructions.items():
        phrasings = section.phrasings
        try:
            if phrasings is None:
                builtin_instruction(name)
            elif isinstance(phrasings, str):
                load_phrasings(phrasings, recipe.base_dir)  # a file, or builtin:<instruction>
        except NsteerError as error:
            hint = (
                ""
                if phrasings
                else " Give `phrasings` (a list or a file) and a `check` for an instruction of your own."
            )
            refuse(("instructions", name, "phrasings"), str(error) + hint)
        check = section.check
        if check is not None:
            try:
                if isinstance(check, str) or check.id is not None:
                    validate_spec(CheckSpec(check, {}) if isinstance(check, str) else CheckSpec(check.id, check.kwargs))
                elif check.regex is not None:
                    recipe._custom_checks[name] = regex_check(check.regex, check.loose)
                else:
                    recipe._custom_checks[name] = function_check(check.function, recipe.base_dir, check.loose)
            except NsteerError as error:
                refuse(("instructions", name, "check"), str(error))
    for index, entry in enumerate(recipe.steer):
        if not entry.vector or entry.vector in recipe.instructions:
            continue  # none, or the vector `compute` writes for that instruction
        try:
            missing = not is_file(input_path(entry.vector, recipe.base_dir))
        except NsteerError as error:
            refuse(("steer", index, "vector"), str(error))
            continue
        if missing:
            refuse(("steer", index, "vector"), f"vector file '{entry.vector}' not found.")
    if problems:
        raise RecipeError(*problems)


_PATH_PREFIXES = ("/", "./", "../", "~")


def model_location(model_id: str, base_dir: Path) -> str:
    """``model_id`` as it is opened from ``base_dir``: a path there (see :attr:`Recipe.model_location`), else as is."""
    if model_id.startswith("embedded:") or "\x00" in model_id:
        return model_id
    path = user_path(model_id, base_dir)
    written_as_path = model_id.startswith(_PATH_PREFIXES) or model_id.endswith(".gguf")
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    return str(path) if exists or written_as_path else model_id


def _model_path_problem(recipe: Recipe) -> str | None:
    """Why ``model.id`` cannot be opened, when that is known without loading anything (a path that is not there)."""
    location = recipe.model_location
    if recipe.model.backend == "ndif" or (location == recipe.model.id and not Path(location).is_absolute()):
        return None  # the embedded model or a Hub id
    if "\x00" in location:
        return "the model id contains a NUL character."
    path = Path(location)
    if not _exists(path):
        where = "" if Path(recipe.model.id).is_absolute() else f" (relative paths are resolved from {recipe.base_dir})"
        return (
            f"'{recipe.model.id}' names no file or folder{where}. Give a folder written by save_pretrained, "
            "a .gguf file, or a Hub id."
        )
    if location.endswith(".gguf") and not path.is_file():
        return f"{location} is a folder, not a GGUF file: a .gguf model is one file."
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
