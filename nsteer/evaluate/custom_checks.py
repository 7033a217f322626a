"""Checks a recipe's author writes: a regular expression, or a Python function of the answer.

IFEval has 25 checks; an instruction of one's own ("end every answer with a question") often has none. A recipe can
name instead

- ``regex: PATTERN`` — the answer passes when ``re.search`` finds the pattern in it;
- ``function: module:name`` — ``name(answer) -> bool`` from ``module``: a file ``module.py`` in the recipe's folder
  (``pkg.mod`` is ``pkg/mod.py``), else a module importable by this Python.

Each may give ``loose:`` (another pattern or ``module:name``) for the loose score; without it the loose score is
IFEval's: the check passes on the answer or on one of its loose variants (first or last line removed, ``*`` removed).

Trust boundary: ``function:`` runs code the recipe names. That is the point — it is the recipe author's own check —
but it means a recipe from someone else is code: read it before running it, as you would a script. This module is the
only place nsteer imports anything a recipe names, and it is only reached from a recipe's ``check`` section: vector
files, job records, prompt and evaluation data never name code, and their check ids are only ever looked up among
IFEval's own checks.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nsteer.errors import EvaluationError

REGEX_PREFIX = "regex:"
FUNCTION_PREFIX = "function:"
_REFERENCE = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*)$")
_MAX_PATTERN = 10_000  # characters; a check is a line, not a document


@dataclass(frozen=True)
class CustomCheck:
    """A check written for a recipe: ``strict(answer) -> bool`` and, optionally, its own ``loose`` variant."""

    name: str  # what reports and vector files record: "regex:PATTERN" or "function:module:name"
    strict: Callable[[str], bool]
    loose: Callable[[str], bool] | None = None  # None: the strict check on IFEval's loose variants of the answer

    def judge(self, check: Callable[[str], bool], answer: str) -> bool:
        """Run one of this check's callables on ``answer``; anything but True or False is an error naming the check."""
        try:
            verdict = check(answer)
        except Exception as error:  # noqa: BLE001 - the user's code: say which check failed on which answer
            raise EvaluationError(
                f"The check {self.name} raised {type(error).__name__}: {error} (on the answer {answer[:80]!r}). "
                "Fix the function, or make it return False for answers it cannot judge."
            ) from error
        if not isinstance(verdict, bool):
            raise EvaluationError(
                f"The check {self.name} returned {verdict!r} ({type(verdict).__name__}); it must return True or False."
            )
        return verdict


def regex_check(pattern: str, loose: str | None = None) -> CustomCheck:
    """A check that passes when ``re.search(pattern, answer)`` finds a match (``loose``: a second pattern)."""
    strict = _compiled(pattern, "regex")
    loose_pattern = _compiled(loose, "loose") if loose is not None else None
    return CustomCheck(
        name=REGEX_PREFIX + pattern,
        strict=lambda answer: strict.search(answer) is not None,
        loose=(lambda answer: loose_pattern.search(answer) is not None) if loose_pattern is not None else None,
    )


def _compiled(pattern: str, field: str) -> re.Pattern[str]:
    if not pattern or len(pattern) > _MAX_PATTERN:
        raise EvaluationError(f"{field}: give a regular expression of 1 to {_MAX_PATTERN} characters.")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise EvaluationError(f"{field}: {pattern!r} is not a regular expression ({error}).") from None


def function_check(reference: str, base_dir: Path, loose: str | None = None) -> CustomCheck:
    """A check that calls ``module:name`` (see the module docstring for where the module is found)."""
    strict = _function(reference, base_dir, "function")
    return CustomCheck(
        name=FUNCTION_PREFIX + reference,
        strict=strict,
        loose=_function(loose, base_dir, "loose") if loose is not None else None,
    )


def _function(reference: str, base_dir: Path, field: str) -> Callable[[str], bool]:
    """Import ``module:name`` and check that it is a callable of one argument."""
    match = _REFERENCE.match(reference)
    if match is None:
        raise EvaluationError(
            f"{field}: {reference!r} is not module:function (e.g. my_checks:ends_with_question, for a function "
            "ends_with_question in my_checks.py next to the recipe)."
        )
    module_name, name = match["module"], match["name"]
    file = base_dir / (module_name.replace(".", "/") + ".py")
    if file.is_file():
        module = _module_from_file(file, field)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise EvaluationError(
                f"{field}: cannot import {module_name!r}: no file {file} next to the recipe, and Python says: {error}."
            ) from None
        except Exception as error:  # noqa: BLE001 - importing ran the user's module
            raise EvaluationError(
                f"{field}: importing {module_name!r} raised {type(error).__name__}: {error}"
            ) from None
    function = getattr(module, name, None)
    if function is None:
        raise EvaluationError(f"{field}: {module_name!r} has no {name!r}.")
    if not callable(function):
        raise EvaluationError(f"{field}: {reference!r} is a {type(function).__name__}, not a function.")
    try:
        inspect.signature(function).bind("answer")
    except TypeError:
        raise EvaluationError(f"{field}: {reference!r} must take one argument, the answer.") from None
    except ValueError:
        pass  # a builtin without a signature: called as it is
    return function


def _module_from_file(file: Path, field: str):  # noqa: ANN202 - a module
    """Import ``file`` as a module of its own (one per file, whatever the current directory or sys.path)."""
    resolved = file.resolve()
    name = f"nsteer_recipe_check_{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}_{file.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise EvaluationError(f"{field}: {file} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        del sys.modules[name]
        raise EvaluationError(f"{field}: importing {file} raised {type(error).__name__}: {error}") from None
    return module
