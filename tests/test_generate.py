"""Steered generation through nsteer equals, token for token, a plain PyTorch forward-hook implementation.

The reference below never calls nsteer's generation or edit code: it left-pads by itself, registers
``register_forward_hook`` on the Hugging Face decoder blocks, counts forward calls to tell the prefill (step 0, every
prompt position) from decoding steps (one new position each, KV cache on), applies DESIGN.md §2's formulas

    set:    h <- h + w (z - h.u) u
    add:    h <- h + w u
    ablate: h <- h - w (h.u) u

sequentially in list order within a layer, and decodes with Hugging Face ``generate`` (greedy unless sampled).

bf16: nsteer applies every edit as ``h + (c - a (h.u)) u`` (``a``, ``c = a t + b`` rounded to the model dtype, two fused
multiply-adds). In fp32 the plain formulas above give the same tokens; in bf16 they do not (each rounding step moves
the result and greedy argmax flips), so the bf16 reference mirrors those rounding steps (``mirrored_edit``), still one
row and one edit at a time from the hook. With it, parity in bf16 is exact too.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from nsteer.edits import Edit, compile_plan
from nsteer.errors import NsteerError
from nsteer.extract import chat_token_ids
from nsteer.generate import GenerationConfig, generate, generate_tokens

FAMILIES = ("llama", "gpt2")
DTYPES = (torch.float32, torch.bfloat16)
DEVICES = (
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
)
PROMPTS = [
    "What are the pros and cons of working from home for a software engineer?",
    "Hi",
    "Describe the water cycle.",
]
MAX_NEW_TOKENS = 12
LAYER = 1


# --- the reference ------------------------------------------------------------------------------------------------


def hook_generate(
    handle,
    prompts: Sequence[str],
    row_edits: Sequence[Sequence[Edit]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    mirror_op_order: bool = False,
) -> list[list[int]]:
    """Greedy generation with the edits applied by plain forward hooks; new tokens per row, cut at the first eos."""
    hf_model, tokenizer = handle.hf_model, handle.tokenizer
    blocks = hf_model.get_submodule(handle.layers_path)
    device = next(hf_model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    sequences = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in sequences]
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)

    state = {"step": -1}  # reset per call; the model's pre-hook makes the prefill step 0
    first = [width - len(s) for s in sequences]  # each row's first real token (skip-first leaves it alone)
    opened: dict[tuple[int, int], bool] = {}  # (row, edit's place in the row's list): the gate's prefill decision

    def count_step(module, args, kwargs):
        state["step"] += 1

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            step = state["step"]
            for row, edits in enumerate(row_edits):
                for place, edit in enumerate(edits):  # sequential, in this row's list order
                    if edit.layer != layer:
                        continue
                    if edit.gate is not None:
                        if step == 0:  # the last prompt token, as the row's earlier edits left it, in float32
                            v = edit.gate_direction if edit.gate_direction is not None else edit.direction
                            last = float(hidden[row, -1].float() @ v.float().to(hidden.device))
                            opened[(row, place)] = last < edit.gate
                        if not opened[(row, place)]:
                            continue
                    if edit.positions == "prompt" and step > 0 or edit.positions == "generated" and step == 0:
                        continue
                    h = hidden[row]  # [T, H]
                    u = edit.direction.to(h.device, h.dtype)
                    hidden = hidden.clone()
                    if mirror_op_order:
                        hidden[row] = mirrored_edit(h, u, edit)
                        continue
                    w = torch.tensor(edit.weight, dtype=h.dtype, device=h.device)
                    projection = (h @ u)[:, None]
                    if edit.mode == "set":
                        coefficient = edit.target - projection
                    elif edit.mode == "add":
                        coefficient = torch.ones_like(projection)
                    else:
                        coefficient = -projection
                    change = w * coefficient
                    if edit.bound is not None:  # the edit may lift the projection up to the bound, no further
                        room = torch.clamp(edit.bound - projection, min=0.0)
                        change = torch.where(change > room, room, change)
                    if edit.skip_first and step == 0:
                        change[first[row]] = 0.0
                    hidden[row] = h + change * u
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    hooks = [hf_model.register_forward_pre_hook(count_step, with_kwargs=True)]
    for layer in sorted({edit.layer for edits in row_edits for edit in edits}):
        hooks.append(blocks[layer].register_forward_hook(make_hook(layer)))
    try:
        with torch.no_grad():
            output = hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
    finally:
        for hook in hooks:
            hook.remove()
    assert state["step"] >= 1  # prefill and at least one decoding step ran through the hooks
    results = []
    for row in range(len(prompts)):
        new = output[row, width:].tolist()
        results.append(new[: new.index(eos)] if eos in new else new)
    return results


def mirrored_edit(h: torch.Tensor, u: torch.Tensor, edit: Edit) -> torch.Tensor:
    """One edit on one row's ``[T, H]`` states with nsteer's rounding steps in a low-precision dtype (bf16 parity).

    The same formula as above, rearranged as ``h + (c - a (h.u)) u`` with ``a`` and ``c = a t + b`` rounded to the
    model dtype once, the projection as a matrix product and each of the two updates as one fused multiply-add.
    """
    weight, target = (torch.tensor(value, dtype=torch.float32) for value in (edit.weight, edit.target))
    a, c = {"set": (weight, weight * target), "add": (0.0, weight), "ablate": (weight, 0.0)}[edit.mode]
    a, c = (torch.as_tensor(value, dtype=torch.float32).to(h.device, h.dtype) for value in (a, c))
    projection = torch.matmul(h, u[:, None])  # [T, 1]
    return h.addcmul(torch.addcmul(c, a, projection, value=-1), u)


def unit_vector(hidden_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(hidden_size, generator=generator, dtype=torch.float32)
    return vector / vector.norm()


def mean_state_direction(handle, layer: int) -> torch.Tensor:
    """The normalized mean of the block output over the prompts' tokens: a direction every state has a lot of."""
    tokenizer = handle.tokenizer
    captured = []
    block = handle.hf_model.get_submodule(handle.layers_path)[layer]
    hook = block.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = torch.tensor(
                    [chat_token_ids(tokenizer, prompt)], device=next(handle.hf_model.parameters()).device
                )
                handle.hf_model(input_ids=ids)
    finally:
        hook.remove()
    mean = torch.cat([c[0].float().cpu() for c in captured]).mean(dim=0)
    return mean / mean.norm()


def mode_edit(handle, mode: str, positions: str, layer: int = LAYER) -> Edit:
    """An edit strong enough to change greedy tokens on the tiny models."""
    if mode == "set":
        return Edit(
            layer=layer,
            direction=unit_vector(handle.hidden_size, 1),
            mode="set",
            weight=1.0,
            target=8.0,
            positions=positions,
        )
    if mode == "add":
        return Edit(
            layer=layer, direction=unit_vector(handle.hidden_size, 2), mode="add", weight=8.0, positions=positions
        )
    return Edit(
        layer=layer, direction=mean_state_direction(handle, layer), mode="ablate", weight=1.0, positions=positions
    )


_PLAIN: dict[tuple, list[list[int]]] = {}


def plain_tokens(handle, key) -> list[list[int]]:
    if key not in _PLAIN:
        _PLAIN[key] = hook_generate(handle, PROMPTS, [[]] * len(PROMPTS))
    return _PLAIN[key]


CONFIG = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)


# --- parity -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unsteered_generation_equals_hf_generate(tiny, family, dtype, device):
    handle = tiny(family, dtype=dtype, device=device)
    expected = plain_tokens(handle, (family, dtype, device))
    assert generate_tokens(handle, PROMPTS, [], config=CONFIG) == expected
    assert len({len(chat_token_ids(handle.tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)  # unequal lengths
    assert max(len(t) for t in expected) >= MAX_NEW_TOKENS - 1  # it really generated


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
@pytest.mark.parametrize("mode", ["set", "add", "ablate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_steered_generation_equals_hook_reference(tiny, family, dtype, mode, positions, device):
    handle = tiny(family, dtype=dtype, device=device)
    edit = mode_edit(handle, mode, positions)
    steered = generate_tokens(handle, PROMPTS, [edit], config=CONFIG)
    expected = hook_generate(handle, PROMPTS, [[edit]] * len(PROMPTS), mirror_op_order=dtype != torch.float32)
    assert steered == expected, (
        "bf16 parity needs nsteer's op order, see the module docstring" if dtype != torch.float32 else ""
    )
    assert steered != plain_tokens(handle, (family, dtype, device)), "the edit must change tokens, or parity is vacuous"


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_holds_with_an_independent_op_order(tiny, family):
    """In fp32 the reference's ``h @ u`` projection already gives nsteer's tokens (see the module docstring)."""
    handle = tiny(family)
    edits = [mode_edit(handle, "set", "all"), mode_edit(handle, "ablate", "generated", layer=2)]
    assert generate_tokens(handle, PROMPTS, edits, config=CONFIG) == hook_generate(handle, PROMPTS, [edits] * 3)


# --- composition --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_two_edits_at_one_layer_apply_in_list_order(tiny, family):
    handle = tiny(family)
    direction = unit_vector(handle.hidden_size, 3)
    add = Edit(layer=LAYER, direction=direction, mode="add", weight=6.0, name="add")
    set_ = Edit(layer=LAYER, direction=direction, mode="set", target=-3.0, name="set")
    add_then_set = generate_tokens(handle, PROMPTS, [add, set_], config=CONFIG)
    set_then_add = generate_tokens(handle, PROMPTS, [set_, add], config=CONFIG)
    assert add_then_set == hook_generate(handle, PROMPTS, [[add, set_]] * 3)
    assert set_then_add == hook_generate(handle, PROMPTS, [[set_, add]] * 3)
    # The order is part of the spec: here `set` after `add` cancels the add (projection -3), before it does not (+3).
    assert add_then_set != set_then_add
    assert add_then_set == generate_tokens(handle, PROMPTS, [set_], config=CONFIG)


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_at_different_layers_compose(tiny, family):
    handle = tiny(family)
    first = Edit(layer=0, direction=unit_vector(handle.hidden_size, 4), mode="set", target=5.0, name="a")
    second = Edit(
        layer=3, direction=unit_vector(handle.hidden_size, 5), mode="add", weight=6.0, positions="generated", name="b"
    )
    # Listed late-layer first: layers still run in forward order.
    both = generate_tokens(handle, PROMPTS, [second, first], config=CONFIG)
    assert both == hook_generate(handle, PROMPTS, [[second, first]] * 3)
    assert both != generate_tokens(handle, PROMPTS, [first], config=CONFIG)
    assert both != generate_tokens(handle, PROMPTS, [second], config=CONFIG)


@pytest.mark.parametrize("family", FAMILIES)
def test_row_edits_equal_each_row_alone(tiny, family):
    handle = tiny(family)
    a = Edit(layer=1, direction=unit_vector(handle.hidden_size, 6), mode="add", weight=8.0, name="a")
    b = Edit(
        layer=1, direction=unit_vector(handle.hidden_size, 7), mode="set", target=6.0, positions="prompt", name="b"
    )
    c = Edit(
        layer=2, direction=unit_vector(handle.hidden_size, 8), mode="add", weight=-7.0, positions="generated", name="c"
    )
    rows = [[a, c], [], [b, a]]
    batched = generate_tokens(handle, PROMPTS, row_edits=rows, config=CONFIG)
    for row, prompt in enumerate(PROMPTS):
        assert batched[row] == hook_generate(handle, [prompt], [rows[row]])[0], f"row {row}"
    assert batched == hook_generate(handle, PROMPTS, rows)
    assert batched[1] == plain_tokens(handle, (family, torch.float32, "cpu"))[1]  # the unsteered row is untouched
    assert batched[0] != plain_tokens(handle, (family, torch.float32, "cpu"))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_row_edits_keep_each_rows_own_order(tiny, family):
    """Two rows share two edits at one layer in opposite orders: each row gets its own order."""
    handle = tiny(family)
    direction = unit_vector(handle.hidden_size, 9)
    add = Edit(layer=LAYER, direction=direction, mode="add", weight=6.0, name="add")
    set_ = Edit(layer=LAYER, direction=direction, mode="set", target=-3.0, name="set")
    rows = [[add, set_], [set_, add], [set_, add]]
    batched = generate_tokens(handle, PROMPTS, row_edits=rows, config=CONFIG)
    assert batched == hook_generate(handle, PROMPTS, rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edit_listed_twice_applies_twice(tiny, family):
    handle = tiny(family)
    add = Edit(layer=LAYER, direction=unit_vector(handle.hidden_size, 10), mode="add", weight=4.0)
    twice = generate_tokens(handle, PROMPTS, [add, add], config=CONFIG)
    assert twice == hook_generate(handle, PROMPTS, [[add, add]] * 3)
    doubled = Edit(layer=LAYER, direction=add.direction, mode="add", weight=8.0)
    assert twice == generate_tokens(handle, PROMPTS, [doubled], config=CONFIG)


MANY_PROMPTS = [
    *PROMPTS,
    "Write a letter to a friend about a trip to the mountains.",
    "Explain how rainbows form after a storm.",
    "Include the word ocean.",
    "What are the pros and cons of working from home?",
    "Describe the lakes and the small villages.",
]


def many_row_edits(handle) -> list[list[Edit]]:
    """Eight rows that each steer differently at layer 1 (and some at 2): directions, modes, weights, positions."""
    width = handle.hidden_size
    mixed = unit_vector(width, 20) + 0.8 * unit_vector(width, 21)  # not orthogonal to direction 21
    mixed = mixed / mixed.norm()
    return [
        [Edit(layer=1, direction=unit_vector(width, 21), mode="add", weight=8.0)],
        [],
        [Edit(layer=1, direction=unit_vector(width, 22), mode="set", weight=1.0, target=7.0, positions="prompt")],
        [Edit(layer=1, direction=mean_state_direction(handle, 1), mode="ablate", weight=0.9)],
        [
            Edit(layer=1, direction=unit_vector(width, 21), mode="add", weight=6.0),
            Edit(layer=1, direction=mixed, mode="set", target=-4.0, positions="generated"),
        ],
        [Edit(layer=1, direction=unit_vector(width, 21), mode="add", weight=-7.0, positions="generated")],
        [
            Edit(layer=2, direction=unit_vector(width, 23), mode="add", weight=9.0),
            Edit(layer=1, direction=unit_vector(width, 24), mode="set", weight=0.5, target=9.0),
        ],
        [Edit(layer=1, direction=mixed, mode="set", weight=1.0, target=-4.0)],
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_many_rows_with_distinct_settings_equal_the_hook_reference(tiny, family, dtype):
    handle = tiny(family, dtype=dtype)
    rows = many_row_edits(handle)
    steered = generate_tokens(handle, MANY_PROMPTS, row_edits=rows, config=CONFIG)
    assert steered == hook_generate(handle, MANY_PROMPTS, rows, mirror_op_order=dtype != torch.float32)
    plain = generate_tokens(handle, MANY_PROMPTS, [], config=CONFIG)
    assert steered[1] == plain[1]  # the row without edits is untouched
    assert sum(steered[row] != plain[row] for row in range(len(rows))) >= 5  # the edits really act


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_layer_edits_with_different_directions_apply_in_list_order(tiny, family, dtype):
    """A later ``set`` on a direction that overlaps an earlier ``add`` sees the add; the other order does not."""
    handle = tiny(family, dtype=dtype)
    first = unit_vector(handle.hidden_size, 30)
    overlapping = first + 0.9 * unit_vector(handle.hidden_size, 31)
    add = Edit(layer=LAYER, direction=first, mode="add", weight=7.0, name="add")
    set_ = Edit(layer=LAYER, direction=overlapping / overlapping.norm(), mode="set", target=-5.0, name="set")
    rows = [[add, set_], [set_, add], [add, set_]]
    batched = generate_tokens(handle, PROMPTS, row_edits=rows, config=CONFIG)
    assert batched == hook_generate(handle, PROMPTS, rows, mirror_op_order=dtype != torch.float32)
    add_then_set = generate_tokens(handle, PROMPTS, [add, set_], config=CONFIG)
    set_then_add = generate_tokens(handle, PROMPTS, [set_, add], config=CONFIG)
    assert add_then_set != set_then_add
    assert batched[0] == add_then_set[0] and batched[1] == set_then_add[1]


def test_the_plan_needs_one_slot_per_edit_a_row_has_at_a_layer_however_many_rows_differ():
    """32 rows with 32 settings at one layer: one slot (one fused update per step); a row's second edit: two."""
    width = 16
    rows = [
        [Edit(layer=3, direction=unit_vector(width, row % 5), mode=mode, weight=0.5 + row, target=float(row))]
        for row, mode in zip(range(32), ["set", "add", "ablate", "set"] * 8)
    ]
    (layer_plan,) = compile_plan(rows)
    assert layer_plan.layer == 3 and layer_plan.slots == 1
    assert layer_plan.directions.shape == (5, width)  # equal directions are stored once
    for row, (edit,) in enumerate(rows):
        assert torch.equal(layer_plan.directions[layer_plan.index[0, row]], edit.direction)
        a = 0.0 if edit.mode == "add" else edit.weight
        b = edit.weight if edit.mode == "add" else 0.0
        t = edit.target if edit.mode == "set" else 0.0
        assert layer_plan.scale[:, 0, row].tolist() == [a, a] and layer_plan.shift[:, 0, row].tolist() == [b, b]
        assert layer_plan.target[0, row].item() == t
    second = Edit(layer=3, direction=unit_vector(width, 9), mode="add", weight=2.0, positions="prompt")
    (two_slots,) = compile_plan([rows[0] + [second], []])
    assert two_slots.slots == 2
    assert two_slots.shift[:, 1, 0].tolist() == [2.0, 0.0]  # prompt only: nothing on generated tokens
    assert two_slots.scale[:, :, 1].abs().sum() == 0 and two_slots.shift[:, :, 1].abs().sum() == 0  # no edits


def test_small_batches_equal_one_batch(tiny):
    handle = tiny("llama")
    edit = mode_edit(handle, "set", "all")
    one_batch = generate_tokens(handle, PROMPTS, [edit], config=CONFIG)
    small = generate_tokens(
        handle, PROMPTS, [edit], config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    )
    assert one_batch == small


# --- sampling, text, errors ---------------------------------------------------------------------------------------


def test_sampled_generation_is_reproducible_with_a_seed(tiny):
    handle = tiny("llama")
    edit = mode_edit(handle, "add", "all")
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.5, seed=123)
    first = generate_tokens(handle, PROMPTS, [edit], config=config)
    again = generate_tokens(handle, PROMPTS, [edit], config=config)
    other = generate_tokens(
        handle,
        PROMPTS,
        [edit],
        config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.5, seed=7),
    )
    assert first == again
    assert first != other
    assert first != generate_tokens(handle, PROMPTS, [edit], config=CONFIG)  # really sampled, not greedy


def test_generate_returns_decoded_text(tiny):
    handle = tiny("llama")
    tokens = generate_tokens(handle, PROMPTS, [], config=CONFIG)
    texts = generate(handle, PROMPTS, [], config=CONFIG)
    assert texts == [handle.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def test_edits_that_do_not_fit_are_refused(tiny):
    handle = tiny("llama")
    with pytest.raises(NsteerError, match="layer 9"):
        generate_tokens(handle, PROMPTS, [Edit(layer=9, direction=unit_vector(handle.hidden_size, 0))], config=CONFIG)
    with pytest.raises(NsteerError, match="width 32"):
        generate_tokens(handle, PROMPTS, [Edit(layer=0, direction=unit_vector(32, 0))], config=CONFIG)
    with pytest.raises(ValueError, match="row_edits"):
        generate_tokens(handle, PROMPTS, row_edits=[[]], config=CONFIG)
