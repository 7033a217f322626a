"""Base prompts, instruction phrasings, seeded splits and with/without-instruction pairs."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nsteer.errors import ArgumentError, PromptDataError, require
from nsteer.evaluate.check_spec import CheckSpec
from nsteer.evaluate.custom_checks import CustomCheck
from nsteer.fileio import (
    MAX_DATA_BYTES,
    MAX_LINE_CHARS,
    builtin_name,
    parse_json,
    parse_yaml,
    read_text,
    text_lines,
    user_path,
)
from nsteer.limits import MAX_SEED

BUILTIN_BASE_SETS = {"base-v1": "base_prompts.jsonl"}
SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class BasePrompt:
    """A request that carries no format, length or word constraint."""

    id: str
    text: str


@dataclass(frozen=True)
class Instruction:
    """An instruction: its phrasings and the IFEval check that judges adherence."""

    id: str
    category: str
    description: str
    check_id: str
    check_kwargs: Mapping[str, Any] = field(default_factory=dict)
    phrasings: tuple[str, ...] = ()
    custom_check: CustomCheck | None = None  # a recipe's own check (regex or function); check_id is then its name

    @property
    def check(self) -> CheckSpec:
        """The check that judges an answer to this instruction."""
        return CheckSpec(self.check_id, dict(self.check_kwargs), custom=self.custom_check)


@dataclass(frozen=True)
class PromptPair:
    """One base request with and without an instruction phrasing appended."""

    base_id: str
    base: str
    phrasing: str

    @property
    def with_instruction(self) -> str:
        """The request followed by the instruction."""
        return f"{self.base} {self.phrasing}"

    @property
    def without_instruction(self) -> str:
        """The bare request."""
        return self.base


@dataclass(frozen=True)
class Split:
    """Items divided into train / validation / test."""

    train: tuple
    validation: tuple
    test: tuple

    def part(self, name: str) -> tuple:
        """The items of the split called ``name``."""
        if name not in SPLIT_NAMES:
            raise PromptDataError(f"Unknown split '{name}'; use one of {', '.join(SPLIT_NAMES)}.")
        return getattr(self, name)


def _data_file(name: str) -> Path:
    return Path(str(resources.files("nsteer") / "data" / name))


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """Read a JSONL, JSON or YAML file into (where, record) pairs, with errors naming the line.

    ``where`` is ``line N`` for JSONL (blank lines skipped but counted) and ``record N`` otherwise.
    """
    hint = "Check the path (relative paths are resolved from the recipe's folder)."
    text = read_text(path, "prompt file", PromptDataError, limit=MAX_DATA_BYTES, hint=hint)
    if path.suffix == ".jsonl":
        records = []
        for number, line in text_lines(text, path, "prompt file", PromptDataError):
            try:
                records.append((f"line {number}", parse_json(line)))
            except ValueError as error:
                raise PromptDataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        return records
    try:
        data = parse_json(text) if path.suffix == ".json" else parse_yaml(text)[0]
    except (ValueError, yaml.YAMLError) as error:
        raise PromptDataError(f"{path}: cannot be parsed: {' '.join(str(error).split())}") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptDataError(f"{path}: expected a list of prompts (strings or objects with a 'text' field).")
    return [(f"record {index + 1}", record) for index, record in enumerate(data)]


def _record_text(record: Any, path: Path, index: int, where: str) -> tuple[str, str]:
    if isinstance(record, str):
        text, identifier = record, f"p{index:05d}"
    elif isinstance(record, dict):
        text = record.get("text", record.get("prompt"))
        identifier = str(record.get("id", record.get("key", f"p{index:05d}")))
    else:
        text, identifier = None, ""
    if not isinstance(text, str) or not text.strip():
        raise PromptDataError(
            f"{path}, {where}: missing a non-empty 'text' (or 'prompt') field. "
            'Each record must be a string or an object like {"text": "..."}.'
        )
    if len(text) > MAX_LINE_CHARS:
        raise PromptDataError(
            f"{path}, {where}: the prompt is {len(text):,} characters long; prompts are limited to "
            f"{MAX_LINE_CHARS:,} characters (no model's context holds more)."
        )
    return identifier, text.strip()


def load_base_prompts(source: str, base_dir: Path | None = None) -> tuple[BasePrompt, ...]:
    """Load base prompts from ``builtin:base-v1`` or a JSONL / JSON / YAML file."""
    require(source, str, "source", "Give builtin:base-v1 or the path of a prompt file.")
    name = builtin_name(source)
    if name is not None:
        if name not in BUILTIN_BASE_SETS:
            raise PromptDataError(f"Unknown built-in prompt set '{name}'; available: {', '.join(BUILTIN_BASE_SETS)}.")
        path = _data_file(BUILTIN_BASE_SETS[name])
    else:
        path = user_path(source, base_dir)
    records = _read_records(path)
    if not records:
        raise PromptDataError(f"{path}: the prompt file is empty; it needs at least one prompt.")
    prompts = tuple(
        BasePrompt(*_record_text(record, path, index, where)) for index, (where, record) in enumerate(records)
    )
    duplicates = {p.id for p in prompts if sum(q.id == p.id for q in prompts) > 1}
    if duplicates:
        raise PromptDataError(f"{path}: prompt ids are not unique: {', '.join(sorted(duplicates)[:5])}.")
    return prompts


def load_phrasings(source: str | Sequence[str], base_dir: Path | None = None) -> tuple[str, ...]:
    """Load phrasings from ``builtin:<instruction>``, an inline list, or a file."""
    name = builtin_name(source) if isinstance(source, str) else None
    if name is not None:
        return builtin_instruction(name).phrasings
    if isinstance(source, str):
        path = user_path(source, base_dir)
        records = _read_records(path)
        phrasings = tuple(_record_text(record, path, index, where)[1] for index, (where, record) in enumerate(records))
    else:
        phrasings = tuple(str(item).strip() for item in source)
    if not phrasings or not all(phrasings):
        raise PromptDataError(f"Phrasings from {source!r} are empty; give at least one non-empty phrasing.")
    return phrasings


@lru_cache(maxsize=1)
def _builtin_instruction_table() -> Mapping[str, Any]:
    path = _data_file("instructions.yaml")
    return parse_yaml(read_text(path, "data file", PromptDataError, limit=MAX_DATA_BYTES))[0]


def builtin_instructions() -> dict[str, Instruction]:
    """Every built-in instruction, word instructions (``include:<word>``) included."""
    table = _builtin_instruction_table()
    found: dict[str, Instruction] = {}
    for name, entry in table.items():
        if name in ("word_inclusion", "word_exclusion"):
            continue
        found[name] = Instruction(
            id=name,
            category=entry["category"],
            description=entry["description"],
            check_id=entry["check"]["id"],
            check_kwargs=dict(entry["check"].get("kwargs") or {}),
            phrasings=tuple(entry["phrasings"]),
        )
    words = table.get("word_inclusion", {})
    for word in words.get("words", []):
        found[f"include:{word}"] = word_instruction(word)
    return found


def word_instruction(word: str) -> Instruction:
    """The inclusion instruction for ``word`` (exclusion steers with this vector and a negative weight)."""
    return _word_template(
        "word_inclusion",
        f"include:{word}",
        f"Include the word '{word}'.",
        "keywords:existence",
        {"keywords": [word]},
        word,
    )


def word_exclusion_instruction(word: str) -> Instruction:
    """The exclusion instruction for ``word``: "do not use W" phrasings judged by keywords:forbidden_words.

    Its phrasings are for prompts and evaluation; steering toward exclusion uses the inclusion vector
    (``include:<word>``) with a negative ``add`` weight.
    """
    return _word_template(
        "word_exclusion",
        f"exclude:{word}",
        f"Do not use the word '{word}'.",
        "keywords:forbidden_words",
        {"forbidden_words": [word]},
        word,
    )


def _word_template(
    table_key: str, identifier: str, description: str, check_id: str, kwargs: dict, word: str
) -> Instruction:
    """An instruction about ``word`` from the ``{word}`` phrasing templates under ``table_key``."""
    template = _builtin_instruction_table().get(table_key, {})
    return Instruction(
        id=identifier,
        category="words",
        description=description,
        check_id=check_id,
        check_kwargs=kwargs,
        phrasings=tuple(p.replace("{word}", word) for p in template.get("phrasings", [])),
    )


def builtin_words() -> tuple[str, ...]:
    """The built-in word list (every word has ``include:<word>`` and ``exclude:<word>``; any other word works too)."""
    return tuple(_builtin_instruction_table().get("word_inclusion", {}).get("words", []))


def builtin_instruction(name: str) -> Instruction:
    """One built-in instruction by id (``lowercase``, ``length_0``, ``include:ocean``, ``exclude:ocean`` ...)."""
    require(name, str, "name", "Give an instruction id such as lowercase (see nsteer list).")
    if name.startswith(("include:", "exclude:")):
        kind, word = name.split(":", 1)
        if not word.strip():
            raise PromptDataError(f"'{name}' names no word: write {kind}:<word>, e.g. {kind}:ocean.")
        return word_instruction(word) if kind == "include" else word_exclusion_instruction(word)
    table = builtin_instructions()
    if name not in table:
        known = ", ".join(sorted(k for k in table if not k.startswith("include:")))
        raise PromptDataError(
            f"Unknown built-in instruction '{name}'. Built-in: {known}, include:<word>, exclude:<word>."
        )
    return table[name]


def split_items(items: Sequence, fractions: Mapping[str, float], seed: int) -> Split:
    """Shuffle with ``seed`` and cut into train / validation / test; every non-empty fraction gets at least one item."""
    order = list(items)
    random.Random(seed).shuffle(order)
    total = sum(fractions.get(name, 0.0) for name in SPLIT_NAMES)
    counts = [int(round(len(order) * fractions.get(name, 0.0) / total)) for name in SPLIT_NAMES]
    for index, name in enumerate(SPLIT_NAMES):
        if fractions.get(name, 0.0) > 0 and counts[index] == 0 and len(order) >= len(SPLIT_NAMES):
            counts[index] = 1
    counts[0] = max(len(order) - counts[1] - counts[2], 0)
    train = tuple(order[: counts[0]])
    validation = tuple(order[counts[0] : counts[0] + counts[1]])
    test = tuple(order[counts[0] + counts[1] :])
    return Split(train, validation, test)


def make_pairs(prompts: Sequence[BasePrompt], phrasings: Sequence[str], seed: int) -> tuple[PromptPair, ...]:
    """Pair each base prompt with one phrasing, cycling through a seeded shuffle so every phrasing is used."""
    if not phrasings:
        raise PromptDataError("An instruction needs at least one phrasing to make prompt pairs.")
    order = list(phrasings)
    random.Random(seed).shuffle(order)
    return tuple(PromptPair(p.id, p.text, order[i % len(order)]) for i, p in enumerate(prompts))


def split_pairs(
    prompts: Sequence[BasePrompt], phrasings: Sequence[str], fractions: Mapping[str, float], seed: int
) -> Split:
    """Split base prompts and phrasings separately with ``seed``, then pair within each split."""
    prompt_split = split_items(prompts, fractions, seed)
    phrasing_split = split_items(phrasings, fractions, seed + 1) if len(phrasings) >= 3 else None
    parts = []
    for name in SPLIT_NAMES:
        own = phrasing_split.part(name) if phrasing_split else tuple(phrasings)
        parts.append(make_pairs(prompt_split.part(name), own or tuple(phrasings), seed))
    return Split(*parts)


def prompt_set_hash(pairs: Sequence[PromptPair]) -> str:
    """A hash identifying exactly which pairs a vector was computed from."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.with_instruction.encode())
        digest.update(b"\x00")
        digest.update(pair.without_instruction.encode())
        digest.update(b"\x01")
    return digest.hexdigest()[:16]


def instruction_pairs(
    instruction: Instruction,
    *,
    base: str = "builtin:base-v1",
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    base_dir: Path | None = None,
) -> Split:
    """Seeded train / validation / test pairs of ``instruction`` over a base prompt set (default 0.6 / 0.2 / 0.2)."""
    require(instruction, Instruction, "instruction", "Get one from nsteer.builtin_instruction.")
    require(seed, int, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise ArgumentError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}.")
    fractions = fractions or {"train": 0.6, "validation": 0.2, "test": 0.2}
    _check_fractions(fractions)
    return split_pairs(load_base_prompts(base, base_dir), instruction.phrasings, fractions, seed)


def _check_fractions(fractions: Mapping[str, float]) -> None:
    """Split fractions name known splits, are finite and non-negative, give train a share and sum to at most 1."""
    unknown = sorted(set(fractions) - set(SPLIT_NAMES))
    if unknown:
        raise ArgumentError(f"Unknown split(s) {', '.join(map(repr, unknown))}; use {', '.join(SPLIT_NAMES)}.")
    for name, value in fractions.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ArgumentError(f"The {name} fraction must be a number from 0 to 1, got {value!r}.")
    if fractions.get("train", 0) <= 0 or sum(fractions.values()) > 1 + 1e-9:
        raise ArgumentError("The train fraction must be positive and the fractions must sum to at most 1.")


def builtin_catalog() -> list[dict[str, Any]]:
    """One row per built-in instruction for `nsteer list`: id, category, check id and kwargs, number of phrasings.

    Word instructions appear as two template rows, ``include:<word>`` and ``exclude:<word>``, each naming the built-in
    words (any other word works too).
    """
    rows = []
    for name, instruction in builtin_instructions().items():
        if name.startswith("include:"):
            continue
        rows.append(
            {
                "id": name,
                "category": instruction.category,
                "check": instruction.check_id,
                "kwargs": dict(instruction.check_kwargs),
                "phrasings": len(instruction.phrasings),
                "words": [],
            }
        )
    words = list(builtin_words())
    for template in (word_instruction("{word}"), word_exclusion_instruction("{word}")):
        kwargs = {key: ["<word>"] for key in template.check_kwargs}
        rows.append(
            {
                "id": template.id.replace("{word}", "<word>"),
                "category": template.category,
                "check": template.check_id,
                "kwargs": kwargs,
                "phrasings": len(template.phrasings),
                "words": words,
            }
        )
    return rows
