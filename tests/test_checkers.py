"""IFEval checkers adapter: real pass/fail behaviour, strict vs loose, spec validation, offline Punkt."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import (
    CheckResult,
    CheckSpec,
    check_all,
    check_response,
    count_sentences,
    count_words,
    known_instruction_ids,
    validate_spec,
)

LOWER = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
CAPITAL_FREQ = "change_case:capital_word_frequency"
NO_COMMA = "punctuation:no_comma"
JSON = "detectable_format:json_format"
TITLE = "detectable_format:title"
BULLETS = "detectable_format:number_bullet_lists"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
SECTIONS = "detectable_format:multiple_sections"
CONSTRAINED = "detectable_format:constrained_response"
END = "startend:end_checker"
QUOTATION = "startend:quotation"
LANGUAGE = "language:response_language"
SENTENCES = "length_constraints:number_sentences"
WORDS = "length_constraints:number_words"
KEYWORDS = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
REPEAT = "combination:repeat_prompt"

ENDING = "Is there anything else I can help with?"
PASS = CheckResult(strict=True, loose=True)
FAIL = CheckResult(strict=False, loose=False)
LOOSE_ONLY = CheckResult(strict=False, loose=True)

# (instruction id, kwargs, response, expected): every expectation was worked out by hand from IFEval's rules.
CASES = [
    (LOWER, {}, "the quick brown fox jumps over the lazy dog while the farmer watches.", PASS),
    (LOWER, {}, "The quick brown fox jumps over the lazy dog while the farmer watches.", FAIL),
    (LOWER, {}, "**Sure**\nthe quick brown fox jumps over the lazy dog while the farmer watches.", LOOSE_ONLY),
    (CAPITAL, {}, "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE THE FARMER WATCHES.", PASS),
    (CAPITAL, {}, "THE QUICK BROWN FOX jumps over the lazy dog while the farmer watches.", FAIL),
    (CAPITAL, {}, "Here you go:\nTHE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE THE FARMER WATCHES.", LOOSE_ONLY),
    (CAPITAL_FREQ, {"capital_frequency": 3, "capital_relation": "at least"}, "NASA and the FBI met the CIA.", PASS),
    (CAPITAL_FREQ, {"capital_frequency": 3, "capital_relation": "at least"}, "NASA and the FBI met today.", FAIL),
    (CAPITAL_FREQ, {"capital_frequency": 2, "capital_relation": "less than"}, "Only NASA is here.", PASS),
    (CAPITAL_FREQ, {"capital_frequency": 2, "capital_relation": "less than"}, "NASA, FBI and CIA.", FAIL),
    (NO_COMMA, {}, "There is not a single comma in this answer.", PASS),
    (NO_COMMA, {}, "Yes, there is one.", FAIL),
    (NO_COMMA, {}, "Sure, here you go:\nThere is not a single comma in this answer.", LOOSE_ONLY),
    (JSON, {}, '{"name": "Ada", "born": 1815}', PASS),
    (JSON, {}, '```json\n{"name": "Ada", "born": 1815}\n```', PASS),
    (JSON, {}, 'Sure, here it is:\n{"name": "Ada", "born": 1815}', LOOSE_ONLY),
    (JSON, {}, "name: Ada, born: 1815", FAIL),
    (TITLE, {}, "<<Ode to the Sea>>\nThe waves roll in.", PASS),
    (TITLE, {}, "Ode to the Sea\nThe waves roll in.", FAIL),
    (BULLETS, {"num_bullets": 3}, "* apples\n* pears\n* plums", PASS),
    (BULLETS, {"num_bullets": 3}, "- apples\n- pears\n- plums", PASS),
    (BULLETS, {"num_bullets": 3}, "* apples\n* pears", FAIL),
    (BULLETS, {"num_bullets": 3}, "* Fruit I like:\n* apples\n* pears\n* plums", LOOSE_ONLY),
    (HIGHLIGHTS, {"num_highlights": 2}, "This has *one part* and *another part* highlighted.", PASS),
    (HIGHLIGHTS, {"num_highlights": 2}, "Only *one part* is highlighted.", FAIL),
    (SECTIONS, {"section_spliter": "Section", "num_sections": 2}, "Section 1\nIntro.\nSection 2\nMore.", PASS),
    (SECTIONS, {"section_spliter": "Section", "num_sections": 2}, "Section 1\nOnly one section.", FAIL),
    (CONSTRAINED, {}, "My answer is yes.", PASS),
    (CONSTRAINED, {}, "I think the answer is yes.", FAIL),
    (END, {"end_phrase": ENDING}, f"Paris is the capital of France. {ENDING}", PASS),
    (END, {"end_phrase": ENDING}, f"Paris is the capital of France. {ENDING} Bye.", FAIL),
    (END, {"end_phrase": ENDING}, f"Paris is the capital of France.\n{ENDING}\n(generated)", LOOSE_ONLY),
    (END, {"end_phrase": ENDING}, f"Paris is the capital of France. **{ENDING}**", LOOSE_ONLY),
    (QUOTATION, {}, '"Hello there, how are you?"', PASS),
    (QUOTATION, {}, "Hello there, how are you?", FAIL),
    (QUOTATION, {}, 'Sure:\n"Hello there, how are you?"', LOOSE_ONLY),
    (LANGUAGE, {"language": "fr"}, "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans.", PASS),
    (LANGUAGE, {"language": "fr"}, "Hello, my name is Mary and I have lived in London for ten years.", FAIL),
    (LANGUAGE, {"language": "hi"}, "मेरा नाम मैरी है और मैं दस साल से दिल्ली में रहती हूँ।", PASS),
    (SENTENCES, {"num_sentences": 3, "relation": "less than"}, "Dr. Smith went home. He was tired.", PASS),
    (SENTENCES, {"num_sentences": 3, "relation": "less than"}, "It rains. It pours. It floods. It stops.", FAIL),
    (SENTENCES, {"num_sentences": 3, "relation": "at least"}, "It rains. It pours. It floods.", PASS),
    (WORDS, {"num_words": 5, "relation": "less than"}, "Just four words here.", PASS),
    (WORDS, {"num_words": 5, "relation": "less than"}, "This sentence has more than five words.", FAIL),
    (WORDS, {"num_words": 5, "relation": "at least"}, "This sentence has more than five words.", PASS),
    (KEYWORDS, {"keywords": ["apple", "banana"]}, "I like Apple pie and banana bread.", PASS),
    (KEYWORDS, {"keywords": ["apple", "banana"]}, "I like apple pie.", FAIL),
    (FORBIDDEN, {"forbidden_words": ["bad"]}, "Badminton is a good sport.", PASS),
    (FORBIDDEN, {"forbidden_words": ["bad"]}, "That was a BAD idea.", FAIL),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_checker_strict_and_loose(instruction_id: str, kwargs: dict, response: str, expected: CheckResult) -> None:
    assert check_response(CheckSpec(instruction_id, kwargs), response) == expected


def test_cases_cover_the_required_instruction_types() -> None:
    covered = {case[0] for case in CASES if case[3] == PASS} & {case[0] for case in CASES if case[3] == FAIL}
    assert len(covered) >= 17
    assert any(case[3] == LOOSE_ONLY for case in CASES)


def test_repeat_prompt_uses_prompt_to_repeat() -> None:
    spec = CheckSpec(REPEAT, {"prompt_to_repeat": "Write a haiku about rain."})
    prompt = "Write a haiku about rain. First repeat the request word for word."
    assert check_response(spec, "Write a haiku about rain. Soft drops on the roof.", prompt) == PASS
    assert check_response(spec, "Soft drops on the roof.", prompt) == FAIL


def test_empty_response_fails_everything() -> None:
    # IFEval scores a blank response as failing, even for "no comma" which it trivially satisfies.
    assert check_response(CheckSpec(NO_COMMA), "   \n") == FAIL


def test_hf_style_kwargs_with_none_values_are_accepted() -> None:
    # IFEval's data set lists every kwarg name in every row, None where it does not apply.
    spec = CheckSpec(NO_COMMA, {"num_words": None, "relation": None})
    validate_spec(spec)
    assert check_response(spec, "No comma here.") == PASS


def test_check_all_keeps_order_and_scores_each_instruction() -> None:
    specs = [CheckSpec(LOWER), CheckSpec(NO_COMMA), CheckSpec(WORDS, {"num_words": 3, "relation": "less than"})]
    assert check_all(specs, "hello, dear friend of mine.") == (PASS, FAIL, FAIL)
    assert check_all([], "anything") == ()


def test_check_all_validates_every_spec_first() -> None:
    with pytest.raises(EvaluationError, match="nope"):
        check_all([CheckSpec(LOWER), CheckSpec("nope")], "hello")


def test_spec_kwargs_are_a_read_only_copy() -> None:
    kwargs = {"num_bullets": 2}
    spec = CheckSpec(BULLETS, kwargs)
    kwargs["num_bullets"] = 5
    assert spec.kwargs["num_bullets"] == 2
    with pytest.raises(TypeError):
        spec.kwargs["num_bullets"] = 7  # type: ignore[index]


def test_known_instruction_ids() -> None:
    ids = known_instruction_ids()
    assert list(ids) == sorted(ids)
    for instruction_id in (
        LOWER,
        CAPITAL,
        CAPITAL_FREQ,
        NO_COMMA,
        JSON,
        TITLE,
        BULLETS,
        HIGHLIGHTS,
        SECTIONS,
        CONSTRAINED,
        END,
        QUOTATION,
        LANGUAGE,
        SENTENCES,
        WORDS,
        KEYWORDS,
        FORBIDDEN,
        REPEAT,
    ):
        assert instruction_id in ids


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            CheckSpec("change_case:english_lowercse"),
            r"Unknown IFEval instruction id.*Did you mean 'change_case:english_lowercase'",
        ),
        (CheckSpec("nope"), r"Known ids: .*punctuation:no_comma"),
        (CheckSpec(NO_COMMA, {"num_words": 3}), r"unknown kwarg\(s\) num_words; it takes no kwargs"),
        (
            CheckSpec(WORDS, {"num_words": 3, "relaton": "at least"}),
            r"unknown kwarg\(s\) relaton; it takes num_words, relation",
        ),
        (CheckSpec(WORDS, {"num_words": 3}), r"missing kwarg\(s\) relation"),
        (
            CheckSpec(WORDS, {"num_words": -1, "relation": "at least"}),
            r"num_words=-1 is invalid: expected a non-negative integer",
        ),
        (CheckSpec(WORDS, {"num_words": "5", "relation": "at least"}), r"num_words='5' is invalid"),
        (
            CheckSpec(WORDS, {"num_words": 5, "relation": "at most"}),
            r"relation='at most' is invalid: expected one of 'less than', 'at least'",
        ),
        (
            CheckSpec(KEYWORDS, {"keywords": "apple"}),
            r"keywords='apple' is invalid: expected a non-empty list of strings",
        ),
        (CheckSpec(KEYWORDS, {"keywords": ["[unclosed"]}), r"regular expression"),
        (
            CheckSpec(LANGUAGE, {"language": "english"}),
            r"language='english' is invalid: expected an ISO 639-1 code among .*fr",
        ),
        (
            CheckSpec("keywords:letter_frequency", {"letter": "ab", "let_frequency": 2, "let_relation": "at least"}),
            r"single ASCII letter",
        ),
        (CheckSpec(REPEAT, {"prompt_to_repeat": ""}), r"missing kwarg\(s\) prompt_to_repeat|expected non-empty text"),
    ],
)
def test_invalid_specs_raise_evaluation_error(spec: CheckSpec, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        validate_spec(spec)
    with pytest.raises(EvaluationError):
        check_response(spec, "some response")


@pytest.mark.parametrize(
    ("kwargs", "operator"),
    [
        ({"keywords": ["dream", "(a+)+$"]}, "+"),
        ({"keywords": [".*.*x"]}, "*"),
        ({"keywords": ["cat|dog"]}, "|"),
        ({"keywords": ["x{30}"]}, "{"),
    ],
)
def test_data_regexes_that_can_backtrack_are_refused(kwargs, operator) -> None:
    """IFEval matches keywords as regular expressions with Python's re, which has no time limit: a data file's
    ``(a+)+$`` against a long answer of ``a``s runs for hours. Plain words (escapes, classes, boundaries) pass."""
    with pytest.raises(EvaluationError, match=re.escape(f"repeats or alternates ({operator!r})")):
        validate_spec(CheckSpec(KEYWORDS, kwargs))
    validate_spec(CheckSpec(KEYWORDS, {"keywords": ["dream", r"\bit's\b", "[*+?]", "(?i)tree", "a.b"]}))
    validate_spec(CheckSpec("keywords:forbidden_words", {"forbidden_words": ["good", "bad"]}))


def test_count_words_matches_ifeval_word_rule() -> None:
    assert count_words("Hello, world! It's 3pm.") == 5  # Hello, world, It, s, 3pm
    assert count_words("") == 0
    assert count_words("one-two three_four") == 3  # underscores are word characters, hyphens are not


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Dr. Smith went home. He was tired.", 2),  # an abbreviation a naive splitter would cut at
        ("It was 5 p.m. on Monday. We left early!", 2),
        ("Is it raining? Yes. Take an umbrella.", 3),
        ("one sentence without a final stop", 1),
        ("", 0),
    ],
)
def test_count_sentences_uses_punkt(text: str, expected: int) -> None:
    assert count_sentences(text) == expected


def test_count_sentences_agrees_with_an_independent_punkt() -> None:
    import punkt

    texts = [
        "Mr. and Mrs. Brown live on Elm St. in Springfield. They have two cats.",
        "The U.S. economy grew 2.5 percent. Analysts at Goldman Sachs Inc. were surprised.",
        "First line\nsecond line. Third! Fourth? Fifth...",
    ]
    for text in texts:
        assert count_sentences(text) == len(punkt.sent_tokenize(text, "english"))


@pytest.mark.parametrize("where", ["NSTEER_CACHE_DIR", "XDG_CACHE_HOME"])
def test_offline_with_empty_nltk_data_and_no_network(tmp_path: Path, where: str) -> None:
    """A fresh process with no NLTK data anywhere and every socket refused still counts sentences; the Punkt model
    goes into nsteer's cache folder, the one the de-quantized model uses."""
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    script = textwrap.dedent(
        """
        import json, socket

        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        import nltk
        nltk.download = refuse
        from nsteer.evaluate.checkers import CheckSpec, check_response, count_sentences
        spec = CheckSpec("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"})
        print(json.dumps({
            "sentences": count_sentences("Dr. Smith went home. He was tired. It was late."),
            "capital_words": check_response(spec, "NASA and the FBI met.").strict,
            "path": nltk.data.path,
        }))
        """
    )
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("NSTEER_CACHE_DIR", "XDG_CACHE_HOME")},
        "NLTK_DATA": str(empty),
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    if where == "NSTEER_CACHE_DIR":
        env["NSTEER_CACHE_DIR"] = str(home / "nsteer-cache")
        cache = home / "nsteer-cache"
    else:
        env["XDG_CACHE_HOME"] = str(home / "cache")
        cache = home / "cache" / "nsteer"
    for _ in range(2):  # the first run writes the model, the second reuses it
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["sentences"] == 3
        assert result["capital_words"] is True
        assert str(empty) == result["path"][0]
    model_dir = next(cache.glob("nltk_data-punkt-*")) / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    ]
    assert not any(empty.iterdir())


def test_case_checkers_require_langdetect_english_as_ifeval_does() -> None:
    # IFEval's case checkers also demand langdetect say "en": very short answers fail even when the case is right.
    assert check_response(CheckSpec(LOWER), "yes") == FAIL
    assert check_response(CheckSpec(CAPITAL), "MY ANSWER IS YES.") == FAIL
    assert check_response(CheckSpec(LOWER), "my answer is yes.") == PASS


def test_verdicts_are_reproducible() -> None:
    # Unseeded langdetect flipped this verdict in about one call in twenty.
    text = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE THE FARMER WATCHES."
    assert {check_response(CheckSpec(CAPITAL), text) for _ in range(60)} == {PASS}
