"""scripts/clamp_vs_add.py measures a clamped edit's mean lift from one unsteered pass over each answer. The reference
makes the clamped edit itself with a forward hook during a KV-cached greedy generation and records the lift it applies
at every position: the tokens and the lifts must agree."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
from test_generate import LAYER, PROMPTS, unit_vector

from nsteer.edits import Edit
from nsteer.extract import chat_token_ids
from nsteer.generate import GenerationConfig, generate_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from clamp_vs_add import mean_lift  # noqa: E402

MAX_NEW_TOKENS = 10


def hook_generation(
    handle, prompt: str, u: torch.Tensor, bound: float, weight: float
) -> tuple[list[int], list[float], list[float]]:
    """Greedy, one prompt, KV cache on; the hook adds min(w, max(b − h·u, 0)) u and records h·u and that lift."""
    hf = handle.hf_model
    block = hf.get_submodule(handle.layers_path)[LAYER]
    lifts: list[float] = []
    projections: list[float] = []

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        projection = hidden[0].float() @ u
        lift = torch.clamp(bound - projection, min=0.0).clamp(max=weight)
        projections.extend(projection.tolist())
        lifts.extend(lift.tolist())
        edited = hidden + (lift[:, None] * u)[None].to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    eos = handle.tokenizer.eos_token_id
    ids = torch.tensor([chat_token_ids(handle.tokenizer, prompt)])
    tokens: list[int] = []
    removable = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = hf(ids, use_cache=True)
            for _ in range(MAX_NEW_TOKENS):
                token = int(out.logits[0, -1].argmax())
                if token == eos:
                    break
                tokens.append(token)
                if len(tokens) == MAX_NEW_TOKENS:
                    break
                out = hf(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
    finally:
        removable.remove()
    return tokens, lifts, projections


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_measured_mean_lift_equals_the_lift_the_clamped_edit_applied(tiny, family):
    handle = tiny(family)
    u = unit_vector(handle.hidden_size, 2)
    weight = 8.0
    # A bound near the unsteered projections, so some positions get the full weight, some part of it, some none.
    plain = hook_generation(handle, PROMPTS[0], u, bound=0.0, weight=0.0)[2]  # a lift of 0: unsteered projections
    bound = statistics.median(plain)  # half the positions above it (no lift), some just below (part of the weight)
    edit = Edit(layer=LAYER, direction=u, mode="add", weight=weight, bound=bound)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=len(PROMPTS))
    answers = generate_tokens(handle, PROMPTS, [edit], config=config)
    references = [hook_generation(handle, prompt, u, bound, weight) for prompt in PROMPTS]
    assert answers == [tokens for tokens, _, _ in references] and any(answers)  # the same answers and positions
    applied = [lift for _, lifts, _ in references for lift in lifts]
    assert all(any(test(lift) for lift in applied) for test in (lambda x: x == 0, lambda x: 0 < x < weight))
    measured = mean_lift(handle, PROMPTS, answers, LAYER, u, bound, weight, MAX_NEW_TOKENS)
    assert measured["positions"] == len(applied)
    assert measured["mean"] == pytest.approx(statistics.fmean(applied), rel=1e-4, abs=1e-4)
    assert measured["share_at_full_weight"] == pytest.approx(statistics.fmean(lift >= weight for lift in applied))
