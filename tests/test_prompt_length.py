"""Prompts that do not fit the model's context are refused (or cut, when asked) before anything runs.

Two families: a tiny Llama (rotary positions: past its context it runs on, silently wrong) and a tiny GPT-2 (a learned
position table: past ``n_positions`` it fails with an IndexError deep inside ``generate``). The bound nsteer enforces
is checked against the model itself: Hugging Face's own ``generate`` succeeds at the bound and fails one past it.
"""

from __future__ import annotations

import types

import pytest
import torch

from nsteer.errors import ArgumentError, NsteerError, PromptDataError
from nsteer.evaluate.table import EvalItem, evaluate
from nsteer.extract import chat_token_ids, compute_vector, fitted_token_ids
from nsteer.generate import GenerationConfig, check_prompts_fit, generate, generate_tokens
from nsteer.models import context_length
from nsteer.prompts import Instruction, PromptPair

POSITIONS = 48
FAMILIES = ("llama", "gpt2")
WORDS = "the sky is blue because of rayleigh scattering of sunlight in the air "


@pytest.fixture(params=FAMILIES)
def small(request, tiny):
    """A tiny model of each family whose context is only 48 positions."""
    return tiny(request.param, positions=POSITIONS)


def prompt_of(handle, n_tokens: int) -> str:
    """A prompt whose chat-templated ids are exactly ``n_tokens`` long (found by growing a text word by word)."""
    words = (WORDS * 40).split()
    for count in range(1, len(words)):
        text = " ".join(words[:count])
        length = len(chat_token_ids(handle.tokenizer, text))
        if length == n_tokens:
            return text
        if length > n_tokens:
            break
    # Token merges skipped the exact length: pad with single characters until it is reached.
    text = " ".join(words[: count - 1])
    while len(chat_token_ids(handle.tokenizer, text)) < n_tokens:
        text += "!"
    assert len(chat_token_ids(handle.tokenizer, text)) == n_tokens
    return text


# ------------------------------------------------------------------------------------------------- the limit itself


def test_context_length_from_each_family_config(tiny):
    assert tiny("llama", positions=48).context_length == 48  # max_position_embeddings
    assert tiny("gpt2", positions=40).context_length == 40  # n_positions
    mpt = types.SimpleNamespace(max_seq_len=2048)
    assert context_length(mpt) == 2048
    wrapper = types.SimpleNamespace(text_config=types.SimpleNamespace(max_position_embeddings=4096))
    assert context_length(wrapper) == 4096  # multimodal wrappers keep it in text_config


def test_context_length_falls_back_to_a_real_tokenizer_limit_and_else_none():
    stateless = types.SimpleNamespace()  # e.g. a state-space or ALiBi model: the config states no position limit
    assert context_length(stateless, types.SimpleNamespace(model_max_length=2048)) == 2048
    assert context_length(stateless, types.SimpleNamespace(model_max_length=int(1e30))) is None  # HF's "unset"
    assert context_length(stateless, None) is None
    config = types.SimpleNamespace(max_position_embeddings=1024)
    assert context_length(config, types.SimpleNamespace(model_max_length=512)) == 1024  # the config decides


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bound_is_the_models_own(tiny, family):
    """A sequence of prompt + new tokens as long as the context generates; GPT-2 fails just past it.

    nsteer counts the whole sequence (the answer must fit the model's window); the model itself never reads the last
    generated token, so its own failure starts one token later.
    """
    handle = tiny(family, positions=POSITIONS)
    new = 8

    def hf_generate(text: str) -> torch.Tensor:
        ids = torch.tensor([chat_token_ids(handle.tokenizer, text)])
        return handle.hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=handle.tokenizer.pad_token_id,
        )

    at_the_bound = prompt_of(handle, POSITIONS - new)
    assert fitted_token_ids(handle, at_the_bound, new_tokens=new) == chat_token_ids(handle.tokenizer, at_the_bound)
    assert hf_generate(at_the_bound).shape[1] == POSITIONS
    with pytest.raises(PromptDataError):
        fitted_token_ids(handle, prompt_of(handle, POSITIONS - new + 1), new_tokens=new)
    if family == "gpt2":  # the failure nsteer's check stands in front of
        with pytest.raises(IndexError):
            hf_generate(prompt_of(handle, POSITIONS - new + 2))


# ------------------------------------------------------------------------------------------------------- generation


def test_an_over_long_prompt_is_refused_by_name_before_anything_runs(small):
    calls = []
    fine = prompt_of(small, 20)
    long_text = "Explain\x1b[31m this " + WORDS * 20  # an escape sequence in it is shown, not sent to a terminal
    with pytest.raises(PromptDataError) as raised:
        generate(
            small,
            [fine, long_text],
            config=GenerationConfig(max_new_tokens=4),
            progress=lambda done, total: calls.append(done),
        )
    message = str(raised.value)
    assert "'Explain\\x1b[31m this" in message and "…" in message  # shortened, control character escaped
    assert f"handles at most {POSITIONS} positions" in message and "truncate_prompts" in message
    assert "\x1b" not in message
    assert calls == []  # refused before the first batch, not after the short prompt's answer


def test_max_new_tokens_counts_toward_the_context(small):
    text = prompt_of(small, 30)
    assert len(generate_tokens(small, [text], config=GenerationConfig(max_new_tokens=POSITIONS - 30))) == 1
    with pytest.raises(PromptDataError, match=r"is 30 tokens long .* max_new_tokens is 19: 49 positions"):
        generate(small, [text], config=GenerationConfig(max_new_tokens=POSITIONS - 29))
    with pytest.raises(PromptDataError, match="max_new_tokens 48 leaves no room for a prompt"):
        generate(small, ["Hi"], config=GenerationConfig(max_new_tokens=POSITIONS))


def test_truncation_on_request_keeps_the_prompts_end_and_the_template(small):
    new = 6
    text = "Begin here. " + WORDS * 10 + "Answer in lowercase."
    ids = fitted_token_ids(small, text, new_tokens=new, truncate=True)
    assert POSITIONS - new - 3 <= len(ids) <= POSITIONS - new  # cut to fit, and not much shorter than it could be
    template = chat_token_ids(small.tokenizer, "")
    decoded = small.tokenizer.decode(ids)
    assert decoded.startswith(small.tokenizer.decode(template[:3]))  # the chat template's opening is intact
    assert decoded.endswith(small.tokenizer.decode(template[-3:]))  # ... and its generation prompt
    assert "Answer in lowercase." in decoded and "Begin here." not in decoded
    config = GenerationConfig(max_new_tokens=new, truncate_prompts=True)
    (answer,) = generate_tokens(small, [text], config=config)  # GPT-2 would have failed with an IndexError
    assert len(answer) <= new


def test_a_run_of_many_generations_checks_every_prompt_first(small):
    """eval: an over-long prompt in the last group stops the run before the first group is generated."""
    generated = []

    def generator(handle, prompts, **kwargs):
        generated.append(list(prompts))
        return ["answer"] * len(prompts)

    def item(key: str, text: str, group: str) -> EvalItem:
        return EvalItem(key, group, "format", text + " Answer in lowercase.", text, (), (group,))

    items = [item("a", "Hi there.", "first"), item("b", WORDS * 20, "second")]
    with pytest.raises(PromptDataError, match="handles at most 48 positions"):
        evaluate(small, items, {}, config=GenerationConfig(max_new_tokens=4), generator=generator)
    assert generated == []
    check_prompts_fit(small, ["Hi there."], GenerationConfig(max_new_tokens=4))  # a run that fits passes


# ------------------------------------------------------------------------------------------------------- extraction


def test_extraction_refuses_an_over_long_pair_naming_its_base_prompt(small):
    instruction = Instruction("lowercase", "format", "", "change_case:english_lowercase", {}, ("Use lowercase.",))
    pairs = [PromptPair("b1", "Hi there.", "Use lowercase."), PromptPair("b2", WORDS * 20, "Use lowercase.")]
    with pytest.raises(PromptDataError, match=r"base prompt b2 'the sky is blue.*handles at most 48 positions"):
        compute_vector(small, instruction, pairs)
    vector = compute_vector(small, instruction, pairs[:1])
    assert torch.isfinite(vector.directions).all()


# ---------------------------------------------------------------------------------------------- SDK argument errors


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 8193},
        {"max_new_tokens": True},
        {"max_new_tokens": 2.5},
        {"batch_size": 0},
        {"temperature": float("inf")},
        {"temperature": float("nan")},
        {"temperature": 0},
        {"top_p": 0},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": 2**63},  # torch.manual_seed overflows past 2**64 - 1; one bound with recipes (2**63 - 1)
        {"do_sample": "yes"},
    ],
)
def test_generation_config_refuses_bad_settings_with_an_nsteer_error(settings):
    with pytest.raises(ArgumentError) as raised:
        GenerationConfig(**settings)
    assert isinstance(raised.value, NsteerError) and isinstance(raised.value, ValueError)
    assert next(iter(settings)) in str(raised.value)


def test_generate_refuses_a_bare_string_and_empty_prompts(small):
    with pytest.raises(ArgumentError, match=r"write \['hi'\] for one prompt"):
        generate(small, "hi")
    with pytest.raises(ArgumentError, match="prompt 1 is empty"):
        generate(small, ["Hi", "  "])
    with pytest.raises(ArgumentError, match="row_edits has 1 entries for 2 prompts"):
        generate(small, ["Hi", "Ho"], row_edits=[[]])
    with pytest.raises(ArgumentError, match="config must be a GenerationConfig"):
        generate(small, ["Hi"], config={"max_new_tokens": 4})


def test_perplexity_under_a_reference_with_a_shorter_context(tiny):
    """A reference model with fewer positions than prompt + answer scores the answer after the prompt's end that fits
    (GPT-2 failed with an IndexError after every answer was generated); an answer longer than its whole context is
    NaN, like an empty one."""
    import math

    import torch.nn.functional as F

    from nsteer.evaluate.quality import _prompt_ids, perplexity

    reference = tiny("gpt2", positions=POSITIONS)
    model, tokenizer = reference.hf_model, reference.tokenizer
    prompt = WORDS * 3
    answer = "the sky is blue because of scattering"
    prompt_ids, answer_ids = _prompt_ids(tokenizer, prompt), tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) + len(answer_ids) > POSITIONS
    kept = prompt_ids[-(POSITIONS - len(answer_ids)) :] + answer_ids  # the reference computation, by hand
    with torch.no_grad():
        logits = model(torch.tensor([kept])).logits[0].float()
    nll = F.cross_entropy(logits[-len(answer_ids) - 1 : -1], torch.tensor(answer_ids))
    (value,) = perplexity(model, tokenizer, [prompt], [answer])
    assert value == pytest.approx(math.exp(float(nll)), rel=1e-4)
    (too_long,) = perplexity(model, tokenizer, ["Hi"], [WORDS * 10])
    assert math.isnan(too_long)
