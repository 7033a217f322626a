"""Quality guards for steered text: degeneracy, hollow answers, prompt echo, substantive passes, and perplexity.

A checker says whether an answer has the requested form; these measures say whether it is still an answer. A pass is
*substantive* when the checker passes and the answer is neither degenerate (empty, broken, looping — within a word,
across tokens, or across sentences and lines) nor hollow (the requested structure with almost no content) nor an echo
(the prompt restated, with next to nothing of its own). All of it is plain string work: cheap, deterministic, and the
same on every machine.
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nsteer.errors import EvaluationError
from nsteer.limits import context_length

# Scripts written without spaces (kana, CJK ideographs, CJK punctuation, full-width forms): each character is a token,
# so loops in Japanese or Chinese are seen at all; everything else is split on whitespace.
_NO_SPACE_CHARS = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_TOKEN = re.compile(f"[{_NO_SPACE_CHARS}]|[^\\s{_NO_SPACE_CHARS}]+")

_MAX_LOOP_TOKENS = 8  # longest repeating unit looked for, in tokens
_LOOP_MIN_REPEATS = 4  # "ha ha ha" is speech; four or more back-to-back copies covering half the text is a loop
_LOOP_MIN_TOKENS = 8
_LOOP_MIN_SHARE = 0.5
_LONG_LOOP_REPEATS = 10  # a loop this long is degenerate even after a normal start
_NGRAM = 4
_NGRAM_MIN_TOKENS = 40  # below this, distinct-n-gram ratios are too noisy to judge
_NGRAM_MIN_DISTINCT = 0.35  # fluent text sits near 0.9 and above
_MAX_CHAR_RUN = 50  # "aaaa…", "!!!!…"; markdown rules and table borders stay far shorter
_BROKEN_MIN_CHARS = 16
_BROKEN_MAX_SYMBOL_SHARE = 0.7  # JSON with short keys reaches about 0.7 symbols; garbage goes beyond
# Inside one run of non-space characters ("SUPERSUBSPUNPUPUPUP", "word-word-word-word"): a unit of 2–16 characters
# with a letter in it, repeated back to back. Words repeat a syllable twice ("banana", "Mississippi" never reach 4
# copies); laughter ("hahaha") stays shorter than 12 characters; digit groups ("1,000,000,000") and table borders
# ("|---|---|") have no letter in their unit.
_WORD_LOOP_MAX_UNIT = 16
_NON_SPACE_RUN = re.compile(r"\S+")
_WORD_LOOP_MIN_REPEATS = 4
_MIXED_LOOP_MIN_REPEATS = 8
_WORD_LOOP_MIN_CHARS = 12
# Sentences and lines: the same one three times is a loop, and so are three repeats spread over long ones (a
# paragraph loop whose sentences each come back once). Short ones ("Lunch:", "Yes.") repeat in normal lists.
_SEGMENT_MIN_WORDS = 3
_SEGMENT_MAX_COPIES = 2
_LONG_SEGMENT_WORDS = 6
_LONG_SEGMENT_MAX_REPEATS = 2  # copies beyond the first, summed over all sentences of 6+ words
_SEGMENT_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORD = re.compile(r"[^\W_]+")


def degeneracy(text: str) -> str | None:
    """None for normal text, else why it is degenerate: "empty", "broken" or "repetition".

    Repetition is looked for at three scales: a unit of characters looping inside one word, a unit of up to 8 tokens
    looping back to back (or very few distinct 4-grams), and a sentence or line of 3+ words occurring 3 or more times.
    """
    if not text.strip():
        return "empty"
    if _is_broken(text):
        return "broken"
    if (
        _has_word_loop(text)
        or _is_repetitive([token.lower() for token in _TOKEN.findall(text)])
        or _repeated_segment(text) is not None
    ):
        return "repetition"
    return None


def _has_word_loop(text: str) -> bool:
    """A run of non-space characters in which a 2–16 character unit holding a letter repeats at least 4 times back
    to back over 12+ characters."""
    for run in _NON_SPACE_RUN.findall(text):
        if len(run) < _WORD_LOOP_MIN_CHARS:
            continue
        folded = run.lower()
        letters = [0]  # letters[i]: letters among the first i characters, so a unit's check is one subtraction
        for char in folded:
            letters.append(letters[-1] + char.isalpha())
        if not letters[-1]:
            continue
        for period in range(2, min(_WORD_LOOP_MAX_UNIT, len(folded) // _WORD_LOOP_MIN_REPEATS) + 1):
            needed = max(_WORD_LOOP_MIN_CHARS, _WORD_LOOP_MIN_REPEATS * period)
            stretch = 0
            for index in range(period, len(folded)):
                stretch = stretch + 1 if folded[index] == folded[index - period] else 0
                if stretch + period < needed:
                    continue
                unit_letters = letters[index + 1] - letters[index + 1 - period]
                # A unit of letters alone loops at 4 copies; one with other characters ("CH2-", ".next", "<br>")
                # is code, formulas or markup at 4 and only a loop at 8.
                if unit_letters == period or (unit_letters and stretch + period >= _MIXED_LOOP_MIN_REPEATS * period):
                    return True
    return False


def _segments(text: str) -> list[str]:
    """Sentences and lines, normalised: lower case, words only (markup, numbering and punctuation dropped)."""
    return [" ".join(_WORD.findall(part.lower())) for part in _SEGMENT_END.split(text) if part.strip()]


def _repeated_segment(text: str) -> str | None:
    """A sentence or line that shows a loop, else None.

    A loop is one sentence or line of 3+ words occurring 3 or more times, or sentences of 6+ words coming back 3
    times in all (each a repeat of an earlier one).
    """
    counts: dict[str, int] = {}
    long_repeats = 0
    for segment in _segments(text):
        words = len(segment.split())
        if words < _SEGMENT_MIN_WORDS and not _is_no_space_script(segment):
            continue
        counts[segment] = counts.get(segment, 0) + 1
        if counts[segment] > 1 and (words >= _LONG_SEGMENT_WORDS or _is_no_space_script(segment)):
            long_repeats += 1
        if counts[segment] > _SEGMENT_MAX_COPIES or long_repeats > _LONG_SEGMENT_MAX_REPEATS:
            return segment
    return None


def _is_no_space_script(segment: str) -> bool:
    """A segment of 6+ characters in a script written without spaces (one 'word' may be a whole sentence)."""
    return len(re.findall(f"[{_NO_SPACE_CHARS}]", segment)) >= 6


def _is_broken(text: str) -> bool:
    """Long runs of one character, or text that is mostly symbols rather than letters, marks and digits."""
    visible = [char for char in text if not char.isspace()]
    longest_run, run = 0, 0
    for index, char in enumerate(visible):
        run = run + 1 if index and char == visible[index - 1] else 1
        longest_run = max(longest_run, run)
    if longest_run >= _MAX_CHAR_RUN:
        return True
    if len(visible) < _BROKEN_MIN_CHARS:
        return False
    # Letters, combining marks (Devanagari vowel signs are marks) and digits make up words in every script.
    wordy = sum(unicodedata.category(char)[0] in "LMN" for char in visible)
    return 1 - wordy / len(visible) > _BROKEN_MAX_SYMBOL_SHARE


def _is_repetitive(tokens: list[str]) -> bool:
    """A back-to-back loop of a 1–8 token unit, or very few distinct 4-grams."""
    count = len(tokens)
    for period in range(1, _MAX_LOOP_TOKENS + 1):
        span = _longest_periodic_span(tokens, period)
        repeats = span / period
        if repeats < _LOOP_MIN_REPEATS or span < _LOOP_MIN_TOKENS:
            continue
        if span >= _LOOP_MIN_SHARE * count or repeats >= _LONG_LOOP_REPEATS:
            return True
    if count >= _NGRAM_MIN_TOKENS:
        ngrams = [tuple(tokens[i : i + _NGRAM]) for i in range(count - _NGRAM + 1)]
        if len(set(ngrams)) / len(ngrams) < _NGRAM_MIN_DISTINCT:
            return True
    return False


def _longest_periodic_span(tokens: list[str], period: int) -> int:
    """Length of the longest stretch where every token equals the one ``period`` before it, unit included.

    A stretch whose unit has no letter or digit (a table border "| --- | --- |") does not count.
    """
    best, run = 0, 0
    for index in range(period, len(tokens)):
        run = run + 1 if tokens[index] == tokens[index - period] else 0
        if run and run + period > best:
            unit = tokens[index - period + 1 : index + 1]
            if any(any(char.isalnum() for char in token) for token in unit):
                best = run + period
    return best


# Hollow answers: the scaffolding a format asks for, with almost nothing in it.
_SECTION_HEADER = re.compile(r"^\W*(section|part|chapter|paragraph|slide|step)\s*(\d+|[ivxlc]+|[a-z])\b\W*", re.I)
_MARKDOWN_HEADING = re.compile(r"^\s*#{1,6}\s+")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_TITLE = re.compile(r"<<[^<>\n]*>>")
_HIGHLIGHT = re.compile(r"\*{1,2}[^*\n]+\*{1,2}")
_MIN_CONTENT_WORDS = 8  # a title and one short clause; every real answer of the embedded model has more
_MIN_BULLETS = 3
_MAX_BULLET_WORDS = 1  # "* Sleep\n* Rest\n* Health"
# Prompt echo: the answer repeats the prompt (or the instruction's own words) in runs of 3+ words and adds almost
# nothing. A short factual answer that reuses 3-4 words of the question ("My answer is yes.") is not an echo.
_ECHO_RUN_WORDS = 3
_ECHO_MIN_COPIED = 5
_ECHO_MAX_OWN_WORDS = 5


@dataclass(frozen=True)
class Quality:
    """What is wrong with an answer as an answer (None everywhere: nothing); see ``assess``."""

    degenerate: str | None = None  # "empty" | "broken" | "repetition"
    hollow: str | None = None  # why, e.g. "structure with 2 words of content"
    echo: str | None = None  # why, e.g. "restates the prompt and adds 1 word"

    @property
    def ok(self) -> bool:
        """Whether the answer is neither degenerate nor hollow nor an echo."""
        return self.degenerate is None and self.hollow is None and self.echo is None

    @property
    def reason(self) -> str | None:
        """The first problem found, labelled (``degenerate: repetition``), or None."""
        for label, value in (("degenerate", self.degenerate), ("hollow", self.hollow), ("echo", self.echo)):
            if value is not None:
                return f"{label}: {value}"
        return None


def assess(answer: str, prompt: str = "") -> Quality:
    """Degeneracy, hollowness and prompt echo of ``answer``.

    ``prompt`` is what the answer is compared with for echo: pass the prompt *with* the instruction (the request and
    the instruction's words), also when the model saw the request alone, so that an answer restating the request and
    appending the requested element ("… Is there anything else I can help with?") counts as an echo in both cells.
    """
    reason = degeneracy(answer)
    if reason == "empty":
        return Quality(degenerate=reason)
    return Quality(degenerate=reason, hollow=hollowness(answer), echo=prompt_echo(answer, prompt) if prompt else None)


def substantive(passed: bool, quality: Quality) -> bool:
    """A substantive pass: the checker passed and the answer is neither degenerate nor hollow nor an echo."""
    return bool(passed) and quality.ok


def hollowness(text: str) -> str | None:
    """Why ``text`` is the requested structure with almost no content (None: it is not).

    Structure is what format instructions ask for: "Section N" headers, <<titles>>, markdown headings, bullets,
    *highlights*. Content is every word outside the headers' "Section N" and the title. An answer with structure is
    hollow when fewer than 8 words of content remain, or when it is only a list of 3+ one-word bullets. Answers
    without such structure are never hollow ("Yes.", "42", "My answer is no." are answers, however short).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    structured = False
    content: list[str] = []
    bullet_words: list[int] = []
    for line in lines:
        if _TITLE.search(line):
            structured = True
            line = _TITLE.sub(" ", line)
        if _HIGHLIGHT.search(line):
            structured = True
        header = _SECTION_HEADER.match(line)
        if header:
            structured = True
            line = line[header.end() :]
        heading = _MARKDOWN_HEADING.match(line)
        if heading:
            structured = True
        bullet = _BULLET.match(line)
        if bullet:
            structured = True
            line = line[bullet.end() :]  # the marker ("1.") is not content
        words = _WORD.findall(line)
        if bullet:
            bullet_words.append(len(words))
        content.extend(words)
    if not structured:
        return None
    if len(content) < _MIN_CONTENT_WORDS:
        return f"structure with {len(content)} word{'s' * (len(content) != 1)} of content"
    prose = len(content) - sum(bullet_words)
    if len(bullet_words) >= _MIN_BULLETS and max(bullet_words) <= _MAX_BULLET_WORDS and prose < _MIN_CONTENT_WORDS:
        return f"{len(bullet_words)} bullets of one word"
    return None


def prompt_echo(answer: str, prompt: str) -> str | None:
    """Why ``answer`` is an echo of ``prompt`` (None: it is not).

    Words of the answer that repeat the prompt in runs of 3 or more words are copied; the rest are the answer's own.
    An echo copies at least 5 words and adds at most 5 of its own.
    """
    answer_words = [word.lower() for word in _WORD.findall(answer)]
    prompt_words = [word.lower() for word in _WORD.findall(prompt)]
    copied = _copied_mask(answer_words, prompt_words)
    n_copied = sum(copied)
    own = len(answer_words) - n_copied
    if n_copied >= _ECHO_MIN_COPIED and own <= _ECHO_MAX_OWN_WORDS:
        return f"restates {n_copied} words of the prompt and adds {own}"
    return None


def _copied_mask(answer: Sequence[str], prompt: Sequence[str]) -> list[bool]:
    """For each answer word, whether it lies in a run of 3+ words that also occurs in the prompt."""
    run = _ECHO_RUN_WORDS
    grams = {tuple(prompt[i : i + run]) for i in range(len(prompt) - run + 1)}
    mask = [False] * len(answer)
    for start in range(len(answer) - run + 1):
        if tuple(answer[start : start + run]) in grams:
            for index in range(start, start + run):
                mask[index] = True
    return mask


def perplexity(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
) -> list[float]:
    """Perplexity of each answer given its chat-templated prompt, over answer tokens only; NaN for an empty answer."""
    if len(prompts) != len(answers):
        raise EvaluationError(
            f"perplexity needs one answer per prompt; got {len(prompts)} prompts, {len(answers)} answers."
        )
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}.")
    rows = [
        (_prompt_ids(tokenizer, p), list(tokenizer(a, add_special_tokens=False)["input_ids"]))
        for p, a in zip(prompts, answers, strict=True)
    ]
    # The reference model may have a shorter context than the model that answered: keep the end of the prompt that
    # fits before the answer; an answer longer than the whole context cannot be scored (NaN, like an empty one).
    limit = context_length(getattr(model, "config", None), tokenizer)
    if limit is not None:
        rows = [
            (prompt[-(limit - len(answer)) :], answer) if len(answer) < limit else (prompt, [])
            for prompt, answer in rows
        ]
    results = [math.nan] * len(rows)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(
        (i for i, (_, answer) in enumerate(rows) if answer), key=lambda i: -len(rows[i][0]) - len(rows[i][1])
    )
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    was_training = model.training
    model.eval()  # dropout off; restored below
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                values = _batch_perplexity(model, [rows[i] for i in batch], pad_id)
                for index, value in zip(batch, values, strict=True):
                    results[index] = value
    finally:
        model.train(was_training)
    return results


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the prompt as the model sees it before answering."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The template writes its own BOS; adding special tokens here would put a second one in front.
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt)["input_ids"])  # a raw prompt gets the tokenizer's usual BOS, if it has one
    if not ids:
        # The first answer token needs something to be predicted from.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise EvaluationError(
                "perplexity got an empty prompt and the tokenizer has no BOS or EOS token to start from."
            )
        ids = [start]
    return ids


def _batch_perplexity(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """One left-padded forward pass; each row's answer sits at the right end, so one slice covers every answer."""
    device = model.device
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    width = max(len(answer) for _, answer in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    extra: dict[str, Any] = {}
    accepted = inspect.signature(model.forward).parameters
    if "position_ids" in accepted:
        # Positions count real tokens only, so a left-padded row sees the positions it would see alone.
        extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = width + 1  # only the positions that predict answer tokens
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    predicting = logits[:, -(width + 1) : -1].float()
    targets = input_ids[:, -width:]
    nll = F.cross_entropy(predicting.transpose(1, 2), targets, reduction="none")
    answer_lengths = torch.tensor([len(answer) for _, answer in rows], device=device)
    is_answer = torch.arange(width, device=device) >= (width - answer_lengths)[:, None]
    mean_nll = (nll * is_answer).sum(-1) / answer_lengths
    return torch.exp(mean_nll).tolist()
