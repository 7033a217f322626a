"""IFEval-format data files: one JSON object per line with a prompt, its instruction ids and their kwargs.

Every record is validated as it is read (types, one kwargs object per instruction id, unique keys, known checkers
with valid arguments); a bad line is an EvaluationError naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec, validate_spec
from nsteer.fileio import MAX_DATA_BYTES, parse_json, read_text, text_lines


@dataclass(frozen=True)
class IFEvalRecord:
    """One line of an IFEval-format JSONL file."""

    key: str
    prompt: str
    checks: tuple[CheckSpec, ...]
    prompt_without_instruction: str | None
    line: int


def read_ifeval_jsonl(path: str | Path) -> list[IFEvalRecord]:
    """Parse an IFEval JSONL file (key, prompt, instruction_id_list, kwargs, optional prompt_without_instruction)."""
    path = Path(path)
    hint = "Give a JSONL file with one prompt per line."
    text = read_text(path, "IFEval data file", EvaluationError, limit=MAX_DATA_BYTES, hint=hint)
    records: list[IFEvalRecord] = []
    seen: set[str] = set()
    for number, line in text_lines(text, path, "IFEval data file", EvaluationError):
        record = _ifeval_record(line, number, path)
        if record.key in seen:
            raise EvaluationError(f"{path}, line {number}: the key {record.key!r} appears twice; keys must be unique.")
        seen.add(record.key)
        records.append(record)
    if not records:
        raise EvaluationError(f"{path}: the file holds no records; it needs one JSON object per line.")
    return records


def _ifeval_record(line: str, number: int, path: Path) -> IFEvalRecord:
    where = f"{path}, line {number}"
    expected = "expected an object with key, prompt, instruction_id_list and kwargs"
    try:
        data = parse_json(line)
    except ValueError as error:
        raise EvaluationError(f"{where}: not valid JSON ({error.msg}); {expected}.") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{where}: {expected}, got {type(data).__name__}.")
    missing = [name for name in ("key", "prompt", "instruction_id_list", "kwargs") if name not in data]
    if missing:
        raise EvaluationError(f"{where}: missing {', '.join(missing)}; {expected}.")
    key, prompt, ids, kwargs = data["key"], data["prompt"], data["instruction_id_list"], data["kwargs"]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise EvaluationError(f"{where}: key must be a string or an integer, got {key!r}.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationError(f"{where}: prompt must be a non-empty string.")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise EvaluationError(f"{where}: instruction_id_list must be a non-empty list of IFEval ids.")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise EvaluationError(
            f"{where}: kwargs must be a list of {len(ids)} object(s), one per entry of instruction_id_list."
        )
    without = data.get("prompt_without_instruction")
    if without is not None and (not isinstance(without, str) or not without.strip()):
        raise EvaluationError(f"{where}: prompt_without_instruction must be a non-empty string when given.")
    checks = tuple(CheckSpec(i, k) for i, k in zip(ids, kwargs))
    for spec in checks:
        try:
            validate_spec(spec)
        except EvaluationError as error:
            raise EvaluationError(f"{where}: {error}") from None
    return IFEvalRecord(str(key), prompt, checks, without, number)
