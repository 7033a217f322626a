"""Activations read through nsteer equal the model's own hidden states; vectors equal a brute-force reference.

The reference is Hugging Face itself (``output_hidden_states`` with mask-derived position ids, and a plain forward
hook for the last block), never nsteer's own output.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from nsteer.extract import chat_token_ids, compute_vector, last_token_sums, left_pad, mean_difference
from nsteer.prompts import Instruction, PromptPair

FAMILIES = ("llama", "gpt2", "gemma2", "qwen2", "gpt_neox", "phi3", "mistral")
DEVICES = (
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
)

# Unequal lengths on purpose: left padding from 0 to ~40 positions.
PROMPTS = [
    "Hi",
    "Explain how rainbows form after a storm and why the colors appear in that order, step by step.",
    "Describe the water cycle.",
    "Write a letter to a friend about a trip to the mountains.",
]

BASES = [
    "Explain how rainbows form.",
    "Write a letter to a friend about a trip to the mountains, the lakes and the small villages.",
    "What are the pros and cons of working from home?",
    "Describe the water cycle.",
    "Why is the sea salty?",
    "Tell me about the lazy dog and the quick brown fox.",
    "How do small villages near lakes get water?",
]
PHRASINGS = ["Answer in lowercase letters.", "Use no commas.", "Wrap the answer in JSON."]
PAIRS = [PromptPair(f"b{i}", base, PHRASINGS[i % len(PHRASINGS)]) for i, base in enumerate(BASES)]
INSTRUCTION = Instruction(
    id="test_instruction", category="format", description="d", check_id="", phrasings=tuple(PHRASINGS)
)


def assert_states_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5) -> None:
    """fp32 closeness at atol 1e-5 on unit-scale activations (scaled by the largest magnitude where that exceeds 1)."""
    expected = expected.to(torch.float64)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=atol * scale, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_states_equal_hf_hidden_states_left_padded(
    tiny, tokenizer, hf_last_token_states, nsteer_states, family, device
):
    handle = tiny(family, device=device)
    sequences = [chat_token_ids(tokenizer, prompt) for prompt in PROMPTS]
    lengths = [len(s) for s in sequences]
    assert len(set(lengths)) == len(lengths) and max(lengths) - min(lengths) > 20  # really unequal: real padding
    input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
    assert (attention_mask[:, 0] == 0).sum() == len(PROMPTS) - 1  # left padded: only the longest row starts real

    states = nsteer_states(handle, input_ids, attention_mask)
    expected = hf_last_token_states(handle.hf_model, handle.layers_path, input_ids, attention_mask)

    assert states.shape == (handle.n_layers, len(PROMPTS), handle.hidden_size)
    assert_states_close(states, expected)
    # The batch's sums split at n_with: the rows before it, and the rest.
    sums = last_token_sums(handle, [(input_ids, attention_mask, 2)])
    assert sums.shape == (2, handle.n_layers, handle.hidden_size) and sums.dtype == torch.float64
    assert_states_close(sums[0], expected[:, :2].sum(dim=1))
    assert_states_close(sums[1], expected[:, 2:].sum(dim=1))


@pytest.mark.parametrize("family", FAMILIES[:-1])
def test_padded_batch_equals_each_prompt_alone(tiny, tokenizer, hf_last_token_states, nsteer_states, family):
    handle = tiny(family)
    sequences = [chat_token_ids(tokenizer, prompt) for prompt in PROMPTS]
    input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
    batched = nsteer_states(handle, input_ids, attention_mask)
    for row, sequence in enumerate(sequences):
        ids = torch.tensor([sequence])
        alone_reference = hf_last_token_states(handle.hf_model, handle.layers_path, ids, torch.ones_like(ids))
        assert_states_close(batched[:, row], alone_reference[:, 0])
        if row == 0:  # the most padded row, also read alone through nsteer
            alone_nsteer = nsteer_states(handle, ids, torch.ones_like(ids))
            assert_states_close(alone_nsteer[:, 0], alone_reference[:, 0])


def test_last_token_states_are_not_the_final_norm(tiny, tokenizer, nsteer_states):
    """The last layer is the block output, not HF's last hidden_states entry (which is after the final norm)."""
    handle = tiny("llama")
    ids = torch.tensor([chat_token_ids(tokenizer, PROMPTS[1])])
    states = nsteer_states(handle, ids, torch.ones_like(ids))
    with torch.no_grad():
        normed = handle.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert not torch.allclose(states[-1, 0], normed.double(), atol=1e-3)


def test_last_token_states_need_no_grad_and_leave_the_model_unchanged(tiny, tokenizer):
    handle = tiny("llama")
    ids = torch.tensor([chat_token_ids(tokenizer, "Hi")])
    with torch.no_grad():
        before = handle.hf_model(input_ids=ids).logits
    states = last_token_sums(handle, [(ids, torch.ones_like(ids), 1)])
    assert not states.requires_grad
    with torch.no_grad():
        after = handle.hf_model(input_ids=ids).logits
    assert torch.equal(before, after)


# --- chat template: no second BOS ---------------------------------------------------------------------------------


def _bos_adding_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The tiny tokenizer, but adding <|im_start|> as BOS on every encode (as Llama-style tokenizers do)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos = tokenizer.bos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)]
    )
    variant = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    variant.chat_template = tokenizer.chat_template
    return variant


@pytest.mark.parametrize("adds_bos", [False, True])
def test_chat_token_ids_have_no_second_bos(tokenizer, adds_bos):
    tok = _bos_adding_tokenizer(tokenizer) if adds_bos else tokenizer
    first = tok.convert_tokens_to_ids("<|im_start|>")
    text = "Explain how rainbows form."
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    ids = chat_token_ids(tok, text)
    # The template opens with <|im_start|> exactly once, and the whole sequence equals the rendered text's tokens.
    assert ids[0] == first and ids[1] != first
    assert ids.count(first) == rendered.count("<|im_start|>") == 2
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    if adds_bos:  # the fault nsteer must not repeat: re-tokenizing the rendered text doubles the BOS
        assert tok(rendered)["input_ids"][:2] == [first, first]


def test_chat_token_ids_end_where_the_answer_starts(tokenizer):
    ids = chat_token_ids(tokenizer, "Hi")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# --- vectors against a brute-force reference ----------------------------------------------------------------------


def _reference_vector(handle, tokenizer, hf_last_token_states, pairs):
    """u_l, û_l, z_l and ‖u_l‖ from per-prompt (unpadded) HF hidden states, in float64."""
    with_states, without_states = [], []
    for pair in pairs:
        for text, sink in ((pair.with_instruction, with_states), (pair.without_instruction, without_states)):
            ids = torch.tensor([chat_token_ids(tokenizer, text)])
            sink.append(hf_last_token_states(handle.hf_model, handle.layers_path, ids, torch.ones_like(ids))[:, 0])
    h_with = torch.stack(with_states, dim=1)  # [L, N, H]
    h_without = torch.stack(without_states, dim=1)
    u = (h_with - h_without).mean(dim=1)  # [L, H]
    norms = torch.linalg.vector_norm(u, dim=-1)
    unit = u / norms[:, None]
    z = torch.einsum("lnh,lh->ln", h_with, unit).mean(dim=1)
    return u, unit, z, norms, h_with, h_without


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_compute_vector_equals_brute_force_mean_difference(tiny, tokenizer, hf_last_token_states, family):
    handle = tiny(family)
    u, unit, z, norms, h_with, h_without = _reference_vector(handle, tokenizer, hf_last_token_states, PAIRS)
    vector = compute_vector(handle, INSTRUCTION, PAIRS, batch_size=4)

    n_layers, hidden = handle.n_layers, handle.hidden_size
    assert vector.directions.shape == (n_layers, hidden)
    assert vector.mean_projections.shape == (n_layers,) and vector.norms.shape == (n_layers,)
    # Unit directions.
    torch.testing.assert_close(
        torch.linalg.vector_norm(vector.directions.double(), dim=-1),
        torch.ones(n_layers, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    scale = max(1.0, h_with.abs().max().item())
    # u_l = ‖u_l‖ û_l equals the brute-force mean difference.
    torch.testing.assert_close(
        vector.directions.double() * vector.norms.double()[:, None], u, atol=1e-5 * scale, rtol=1e-5
    )
    torch.testing.assert_close(vector.norms.double(), norms, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(vector.directions.double(), unit, atol=1e-4, rtol=0)
    # z_l is the mean projection of the with-instruction prompts onto û_l.
    torch.testing.assert_close(vector.mean_projections.double(), z, atol=1e-4 * scale, rtol=1e-5)
    # Not trivially zero: the instruction moved the last-token state.
    assert (norms > 1e-3).all()
    meta = vector.metadata
    assert meta.n_pairs == len(PAIRS) and meta.hidden_size == hidden and meta.n_layers == n_layers
    assert set(meta.phrasings) == set(PHRASINGS)


def test_mean_difference_equals_reference_means(tiny, tokenizer, hf_last_token_states):
    handle = tiny("gemma2")
    _, _, _, _, h_with, h_without = _reference_vector(handle, tokenizer, hf_last_token_states, PAIRS[:4])
    statistics = mean_difference(handle, PAIRS[:4], batch_size=3)
    scale = max(1.0, h_with.abs().max().item())
    assert statistics.count == 4
    torch.testing.assert_close(statistics.mean_with, h_with.mean(dim=1), atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(statistics.mean_without, h_without.mean(dim=1), atol=1e-5 * scale, rtol=0)


def test_batch_size_does_not_change_the_vector(tiny):
    handle = tiny("llama")
    small = compute_vector(handle, INSTRUCTION, PAIRS, batch_size=2)
    large = compute_vector(handle, INSTRUCTION, PAIRS, batch_size=16)
    torch.testing.assert_close(small.directions, large.directions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.mean_projections, large.mean_projections, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.norms, large.norms, atol=1e-5, rtol=1e-5)
    assert small.metadata.prompt_set_hash == large.metadata.prompt_set_hash


def test_pair_order_does_not_change_the_vector(tiny):
    handle = tiny("llama")
    forward = compute_vector(handle, INSTRUCTION, PAIRS, batch_size=4)
    backward = compute_vector(handle, INSTRUCTION, PAIRS[::-1], batch_size=4)
    torch.testing.assert_close(forward.directions, backward.directions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward.mean_projections, backward.mean_projections, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [2, 4, 5, 16])
def test_mean_difference_holds_at_most_one_batch(tiny, batch_size):
    """Streaming: every forward pass carries at most ``batch_size`` prompts and only [L, H] sums are kept.

    Observed from the model's side (a pre-hook on the first block records each pass's batch), so the check does not
    depend on how nsteer splits its own functions.
    """
    handle = tiny("llama")
    seen: list[tuple[int, ...]] = []
    first_block = handle.hf_model.get_submodule(handle.layers_path)[0]

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(tuple(hidden.shape))

    hook = first_block.register_forward_pre_hook(record, with_kwargs=True)
    progress: list[tuple[int, int]] = []
    try:
        statistics = mean_difference(
            handle, PAIRS, batch_size=batch_size, progress=lambda d, t: progress.append((d, t))
        )
    finally:
        hook.remove()
    pairs_per_batch = max(1, batch_size // 2)
    assert len(seen) == math.ceil(len(PAIRS) / pairs_per_batch)
    assert all(shape[0] <= batch_size and shape[2] == handle.hidden_size for shape in seen)
    assert sum(shape[0] for shape in seen) == 2 * len(PAIRS)  # every prompt read once
    assert statistics.mean_with.shape == (handle.n_layers, handle.hidden_size)
    assert statistics.mean_without.shape == (handle.n_layers, handle.hidden_size)
    assert statistics.mean_with.dtype == torch.float64
    assert progress[-1] == (len(PAIRS), len(PAIRS))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_compute_vector_refuses_no_pairs(tiny):
    from nsteer.errors import NsteerError

    with pytest.raises(NsteerError, match="No training pairs"):
        compute_vector(tiny("llama"), INSTRUCTION, [])
