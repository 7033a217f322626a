"""Recipes: pydantic models of the YAML, and loading with errors that name the file, the line and the field."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
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

from nsteer.errors import NsteerError, RecipeError
from nsteer.fileio import MAX_RECIPE_BYTES, YAMLLimitError, parse_yaml, read_text, user_path
from nsteer.models import EMBEDDED_ID

BUILTIN = "builtin:"


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(Strict):
    """Which model to open and how."""

    id: str = Field(
        EMBEDDED_ID, description="embedded:smollm2-135m-instruct, a local directory, a .gguf file, or a Hub id."
    )
    backend: Literal["local", "ndif"] = Field("local", description="local runs here; ndif runs on the NDIF service.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and activations dtype.")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="cpu, cuda, cuda:N or auto.")
    layers_path: str | None = Field(None, description="Dotted path of the decoder-block list, for unusual models.")
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
    seed: int = Field(0, ge=0, description="Seed for the splits and the pairing of prompts with phrasings.")
    max_pairs: int | None = Field(None, gt=0, description="Use at most this many training pairs per instruction.")


class CheckSection(Strict):
    """An IFEval checker and its arguments."""

    id: str = Field(description="IFEval instruction id, e.g. change_case:english_lowercase.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="The checker's keyword arguments.")


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
    layer: int | Literal["auto"] = Field("auto", description="Layer index, or auto for the searched layer.")
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

    @field_validator("layer")
    @classmethod
    def _layer_non_negative(cls, value: Any) -> Any:
        """A layer number is 0 or more (and below the model's layer count, checked when the model is opened)."""
        if isinstance(value, int) and value < 0:
            raise ValueError("layer must be 0 or more (or auto)")
        return value

    @field_validator("weight", "target_scale")
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
        return self


class ExtractionSection(Strict):
    """How vectors are computed."""

    batch_size: int = Field(
        16,
        gt=0,
        le=4096,
        description="Prompts per forward pass; a pair is two prompts, so at least one pair (2 prompts) goes per pass.",
    )


class GenerationSection(Strict):
    """How answers are decoded."""

    max_new_tokens: int = Field(64, gt=0, le=8192, description="Tokens generated per answer (at most).")
    batch_size: int = Field(8, gt=0, le=4096, description="Prompts per batched generation.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    seed: int | None = Field(None, ge=0, description="Seed for sampling, so sampled answers repeat.")


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
    target_scales: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Candidate target scales k for set entries (target k × z_l); [1.0] is the paper's set.",
    )
    condition: Literal["absent", "present", "both"] = Field(
        "absent", description="Score with the instruction absent from the prompt, present, or both."
    )
    max_prompts: int | None = Field(32, gt=0, description="Validation prompts per instruction (per condition).")
    max_new_tokens: int | None = Field(None, gt=0, description="Override generation.max_new_tokens for the sweep.")
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

    _source: Path | None = PrivateAttr(None)
    _lines: Mapping[tuple, int] = PrivateAttr(default_factory=dict)

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

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are resolved from."""
        return self._source.parent if self._source else Path.cwd()

    @property
    def output_dir(self) -> Path:
        """The output folder (relative to the current directory, unlike input files, which follow the recipe)."""
        return user_path(self.output.dir.replace("{name}", self.name))

    def error(self, location: tuple, message: str) -> RecipeError:
        """A RecipeError pointing at ``location`` (e.g. ``("steer", 0, "layer")``) in the recipe's file."""
        return RecipeError(_format(self._source, self._lines, location, message))

    def check_layers(self, n_layers: int) -> None:
        """Refuse steer entries whose layer does not exist in a model with ``n_layers`` blocks."""
        for index, entry in enumerate(self.steer):
            if isinstance(entry.layer, int) and entry.layer >= n_layers:
                raise self.error(
                    ("steer", index, "layer"),
                    f"layer {entry.layer} is out of range: "
                    f"the model has {n_layers} layers (0..{n_layers - 1}), or use auto.",
                )
        for layer in self.search.layers or ():
            if layer >= n_layers:
                raise self.error(
                    ("search", "layers"),
                    f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}).",
                )


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


def _deepest_first(problems: list[Any], data: Any) -> list[Any]:
    """Put first the most specific problem inside the first problem's field: a mapping given to a "number or mapping"
    field is reported by what is wrong inside the mapping (an unknown key), not by "should be a number"."""
    where = [_data_location(data, tuple(problem["loc"]), problem["type"]) for problem in problems]
    first = where[0]
    inside = [
        (len(location), number)
        for number, (location, problem) in enumerate(zip(where, problems))
        if location[: len(first)] == first and len(location) > len(first) and problem["type"] != "missing"
    ]
    if not inside:
        return problems
    chosen = max(inside)[1]
    return [problems[chosen], *(problem for number, problem in enumerate(problems) if number != chosen)]


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
    """Validate a recipe given as a dict (the SDK path); errors are RecipeError naming the field."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError(
            _format(source, lines, (), f"a recipe must be a mapping of sections, got {type(data).__name__}.")
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        # A mistyped key (instruction: for instructions:) also makes a field missing: name the typo first.
        problems = sorted(error.errors(), key=lambda problem: problem["type"] == "missing")
        problems = _deepest_first(problems, data)
        first = problems[0]
        context = first.get("ctx", {}).get("error")
        if isinstance(context, _FieldProblem):
            raise RecipeError(_format(source, lines, context.location, str(context))) from None
        location, message = _pydantic_message(first, data)
        # A union field (e.g. layer: int | "auto") fails once per branch: say all branches in one sentence.
        same = [_pydantic_message(other, data) for other in problems[1:]]
        alternatives = [text for where, text in same if where == location]
        if alternatives:
            message = message.rstrip(".") + "; or " + "; or ".join(text.rstrip(".") for text in alternatives) + "."
        remaining = len(error.errors()) - 1 - len(alternatives)
        extra = f" ({remaining} more problem(s) after this one)" if remaining else ""
        raise RecipeError(_format(source, lines, location, message + extra)) from None
    recipe._source = source
    recipe._lines = dict(lines)
    _check_references(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a YAML recipe file."""
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
    """Check that files, built-in names and checkers the recipe refers to exist, before any model is loaded."""
    from nsteer.evaluate.checkers import CheckSpec, validate_spec
    from nsteer.prompts import builtin_instruction, load_base_prompts

    base = recipe.prompts.base
    try:
        load_base_prompts(base, recipe.base_dir)
    except NsteerError as error:
        raise recipe.error(("prompts", "base"), str(error)) from None
    for name, section in recipe.instructions.items():
        phrasings = section.phrasings
        try:
            if phrasings is None or (isinstance(phrasings, str) and phrasings.startswith(BUILTIN)):
                builtin_instruction(phrasings[len(BUILTIN) :] if phrasings else name)
            elif isinstance(phrasings, str):
                from nsteer.prompts import load_phrasings

                load_phrasings(phrasings, recipe.base_dir)
        except NsteerError as error:
            hint = (
                ""
                if phrasings
                else " Give `phrasings` (a list or a file) and a `check` for an instruction of your own."
            )
            raise recipe.error(("instructions", name, "phrasings"), str(error) + hint) from None
        check = section.check
        if check is not None:
            spec = CheckSpec(check, {}) if isinstance(check, str) else CheckSpec(check.id, dict(check.kwargs))
            try:
                validate_spec(spec)
            except NsteerError as error:
                raise recipe.error(("instructions", name, "check"), str(error)) from None
    for index, entry in enumerate(recipe.steer):
        if entry.vector in recipe.instructions:
            continue  # the vector `compute` writes for that instruction
        try:
            missing = (
                entry.vector
                and not _is_file(user_path(entry.vector, recipe.base_dir))
                and not _is_file(user_path(entry.vector))
            )
        except NsteerError as error:
            raise recipe.error(("steer", index, "vector"), str(error)) from None
        if missing:
            raise recipe.error(("steer", index, "vector"), f"vector file '{entry.vector}' not found.")


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; False for names the file system refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
