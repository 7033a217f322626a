"""Steered generation: batched, left-padded, KV-cached, greedy or sampled, through one nnsight code path."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nsteer.edits import Edit, Plan, compile_plan, validate_edits
from nsteer.errors import ArgumentError, RemoteError, require
from nsteer.execution.results import expect_list, expect_tensor
from nsteer.extract import fitted_token_ids, left_pad, shown
from nsteer.limits import MAX_BATCH_SIZE, MAX_NEW_TOKENS, MAX_SEED, is_finite_number
from nsteer.models import ModelHandle, tf32_matmuls
from nsteer.progress import ProgressCallback


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode: number of new tokens, greedy or sampled, batch size, and what to do with over-long prompts.

    ``truncate_prompts``: a prompt that does not fit the model's context with ``max_new_tokens`` loses the beginning
    of its text until it fits (the end is kept); by default such a prompt is refused before anything is generated.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 32
    truncate_prompts: bool = False

    def __post_init__(self) -> None:
        _require_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _require_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.seed is not None:
            _require_int("seed", self.seed, 0, MAX_SEED)
        for name in ("do_sample", "truncate_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"GenerationConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not is_finite_number(self.temperature) or not self.temperature > 0:  # a 400-digit int is not finite
            raise ArgumentError(
                f"GenerationConfig.temperature must be a finite number above 0, got {self.temperature!r}."
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ArgumentError(f"GenerationConfig.top_p must be a number in (0, 1], got {self.top_p!r}.")

    def generate_kwargs(self, pad_token_id: int) -> dict:
        """Keyword arguments for Hugging Face ``generate``."""
        kwargs: dict = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "pad_token_id": pad_token_id,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence the sampling defaults some generation configs carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ArgumentError(f"GenerationConfig.{name} must be a whole number from {low} to {high}, got {value!r}.")


def steered_generate_batches(
    handle: ModelHandle,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, Plan]],
    generate_kwargs: dict,
) -> list[torch.Tensor]:
    """Run one ``generate`` per ``(input_ids, attention_mask, plan)`` batch in one session (one NDIF request).

    Each edited layer applies ``h <- h + (c - a (h.u)) u`` once per slot (``c = a t + b``; see ``nsteer.edits``), with
    per-row ``u``, ``a`` and ``c`` put on the model's device and dtype at the prefill and kept there for the whole
    generation. A gate closes a row at the prefill by zeroing its ``a`` and ``c`` there for the rest of the run; a
    clamp caps the change at ``max(bound - h.u, 0)``; skip-first zeroes the change on each row's first token.
    The work per step depends on the slots, not on how many rows carry edits or how they differ.
    The loop body uses only tensors, numbers, dicts and the model's own modules, so the identical trace runs on NDIF
    (``nsteer.jobs.collect`` reads the saved name ``outputs``).
    Step 0 is the prefill (``[B, T, H]``); later steps see one new position each (``[B, 1, H]``) with the KV cache.
    """
    model, layers = handle.model, handle.layers
    payloads = [
        (input_ids, attention_mask, first_tokens(attention_mask), [layer.payload() for layer in plan])
        for input_ids, attention_mask, plan in batches
    ]
    outputs = None  # stays None if a remote result does not carry it (checked below)
    with torch.inference_mode(), tf32_matmuls(handle), warnings.catch_warnings():
        # An open-ended step loop ends when generation does; nnsight warns about that by design.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with model.session(**handle.trace_kwargs()):
            outputs = []
            for input_ids, attention_mask, first, plan in payloads:
                with model.generate(**generate_kwargs) as tracer:
                    with tracer.invoke({"input_ids": input_ids, "attention_mask": attention_mask}):
                        resident = {}  # per layer: u as rows [S, B, 1, H] and columns [S, B, H, 1], a, c, ...
                        # A step loop that touches no module would never yield back to the model: only loop with edits.
                        for step in tracer.all() if plan else ():
                            phase = 0 if step == 0 else 1  # the prompt's coefficients, then the generated tokens'
                            for entry in plan:
                                output = layers[entry["layer"]].output
                                hidden = output[0] if isinstance(output, tuple) else output
                                if step == 0:
                                    device, dtype = hidden.device, hidden.dtype
                                    directions = entry["directions"].to(device)
                                    units = directions[entry["index"].to(device)].to(dtype)
                                    offset = entry["scale"] * entry["target"] + entry["shift"]  # c = a t + b
                                    resident[entry["layer"]] = {
                                        "rows": units[:, :, None, :],
                                        "columns": units[:, :, :, None],
                                        # copies: a gate zeroes a closed row's a and c in place
                                        "scale": entry["scale"].to(device, dtype)[:, :, :, None, None].clone(),
                                        "offset": offset.to(device, dtype)[:, :, :, None, None].clone(),
                                    }
                                    if entry["clamped"]:
                                        resident[entry["layer"]]["bound"] = entry["bound"].to(device, dtype)[
                                            :, :, None, None
                                        ]
                                    if entry["skips"]:  # at the prefill, 0 on each row's first token where skipped
                                        resident[entry["layer"]]["keep"] = (
                                            1
                                            - entry["skip_first"].to(device, dtype)[:, :, None, None]
                                            * first.to(device, dtype)[None, :, :, None]
                                        )
                                    if entry["gated"]:  # gate directions in float32: the decision is one comparison
                                        resident[entry["layer"]]["gate_columns"] = directions[
                                            entry["gate_index"].to(device)
                                        ][:, :, :, None]
                                        resident[entry["layer"]]["gate"] = entry["gate"].to(device)
                                state = resident[entry["layer"]]
                                rows, columns, scale, offset = (
                                    state["rows"],
                                    state["columns"],
                                    state["scale"],
                                    state["offset"],
                                )
                                for slot in range(rows.shape[0]):
                                    if step == 0 and entry["gated"]:
                                        # one decision per row, on the last prompt token as it is before this edit
                                        last = torch.matmul(
                                            hidden[:, -1, :].float()[:, None, :], state["gate_columns"][slot]
                                        )
                                        opened = (last[:, 0, 0] < state["gate"][slot]).to(dtype)[:, None, None]
                                        scale[:, slot].mul_(opened)
                                        offset[:, slot].mul_(opened)
                                    projection = torch.matmul(hidden, columns[slot])  # [B, T, 1]
                                    change = torch.addcmul(
                                        offset[phase, slot], scale[phase, slot], projection, value=-1
                                    )
                                    if entry["clamped"]:  # never lift the projection above the bound
                                        change = torch.minimum(change, (state["bound"][slot] - projection).clamp_min(0))
                                    if step == 0 and entry["skips"]:
                                        change = change * state["keep"][slot]
                                    hidden.addcmul_(change, rows[slot])
                    with tracer.invoke():
                        outputs.append(tracer.result.cpu())
            outputs.save()
    # On NDIF the saved value is what the server sent: token ids of each batch, its prompt columns first.
    vocabulary = vocab_size(handle)
    checked = expect_list(outputs, "outputs", len(batches))
    for (input_ids, _, _), tokens in zip(batches, checked):
        expect_tensor(
            tokens, "outputs", dtype=torch.long, shape=(input_ids.shape[0], None), value_range=(0, vocabulary)
        )
        if tokens.shape[1] < input_ids.shape[1]:
            raise RemoteError(
                f"The result 'outputs' is shorter than its prompts ({tokens.shape[1]} < "
                f"{input_ids.shape[1]} columns): it is not what generation returns; nothing was used."
            )
    return checked


def vocab_size(handle: ModelHandle) -> int:
    """How many token ids the model can produce: its embedding rows (config) or its tokenizer's, the larger."""
    config_size = getattr(getattr(handle.hf_model, "config", None), "vocab_size", None)
    return max(len(handle.tokenizer), config_size if isinstance(config_size, int) else 0)


def first_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: each row's first real token in a left-padded batch (the position skip-first leaves alone)."""
    mask = attention_mask.bool()
    return mask & (mask.long().cumsum(dim=1) == 1)


def eos_ids(handle: ModelHandle) -> set[int]:
    """The token ids that end an answer: the model's generation config's and the tokenizer's end-of-sequence ids."""
    ids: set[int] = set()
    for source in (getattr(handle.hf_model, "generation_config", None), handle.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass(frozen=True, eq=False)
class GenerationBatch:
    """One left-padded batch of prompts: which prompts (``rows``) it holds, their ids and mask, and their edit plan."""

    rows: tuple[int, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    plan: Plan


def generation_batches(
    handle: ModelHandle,
    prompts: Sequence[str],
    row_edits: Sequence[Sequence[Edit]],
    *,
    batch_size: int,
    chat: bool = True,
    max_new_tokens: int = 0,
    truncate: bool = False,
) -> list[GenerationBatch]:
    """Tokenize ``prompts`` (chat-templated), sort them by length and cut them into left-padded batches with plans.

    Every prompt is checked first to fit the model's context with ``max_new_tokens`` (or cut to fit with
    ``truncate``), so an over-long prompt is refused before anything runs.
    """
    dtype = handle.dtype
    for per_row in row_edits:
        validate_edits(per_row, n_layers=handle.n_layers, hidden_size=handle.hidden_size, dtype=dtype)
    tokenizer = handle.tokenizer
    encoded = [
        fitted_token_ids(handle, prompt, new_tokens=max_new_tokens, chat=chat, truncate=truncate) for prompt in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = tuple(order[start : start + batch_size])
        input_ids, attention_mask = left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
        batches.append(GenerationBatch(rows, input_ids, attention_mask, compile_plan([row_edits[i] for i in rows])))
    return batches


def store_new_tokens(
    results: list[list[int]], rows: Sequence[int], width: int, tokens: torch.Tensor, eos: set[int]
) -> None:
    """Put each row's generated ids (after the ``width`` prompt columns, cut at the first EOS) into ``results``."""
    for offset, row in enumerate(rows):
        new = tokens[offset, width:].tolist()
        cut = next((i for i, token in enumerate(new) if token in eos), len(new))
        results[row] = new[:cut]


def check_prompts_fit(
    handle: ModelHandle, prompts: Sequence[str], config: GenerationConfig = GenerationConfig(), *, chat: bool = True
) -> None:
    """Refuse, before anything is generated, a prompt that does not fit the model's context with the config's
    ``max_new_tokens`` (unless ``truncate_prompts``); runs of many generations call this once with all their prompts."""
    for prompt in dict.fromkeys(prompt_list(prompts)):
        fitted_token_ids(handle, prompt, new_tokens=config.max_new_tokens, chat=chat, truncate=config.truncate_prompts)


def prompt_list(prompts: object) -> list[str]:
    """``prompts`` as a list of strings; a bare string (which would be read as one prompt per character) is refused."""
    if isinstance(prompts, str):
        raise ArgumentError(
            f"prompts must be a list of strings, got the single string {shown(prompts)}: "
            f"write [{shown(prompts)}] for one prompt."
        )
    if not isinstance(prompts, Sequence) or not all(isinstance(prompt, str) for prompt in prompts):
        raise ArgumentError(f"prompts must be a list of strings, got {type(prompts).__name__}.")
    blank = next((index for index, prompt in enumerate(prompts) if not prompt.strip()), None)
    if blank is not None:
        raise ArgumentError(f"prompt {blank} is empty: {shown(prompts[blank])} asks nothing; give a non-empty prompt.")
    return list(prompts)


def edit_list(edits: object, what: str = "edits") -> list[Edit]:
    """``edits`` as a list of Edit; a single Edit or anything else is refused with what to write instead."""
    if isinstance(edits, Edit):
        raise ArgumentError(f"{what} must be a list of edits, got one Edit: write [edit].")
    if not isinstance(edits, Sequence) or isinstance(edits, str) or not all(isinstance(e, Edit) for e in edits):
        raise ArgumentError(f"{what} must be a list of Edit objects (see nsteer.edit_from_vector).")
    return list(edits)


def edits_per_row(
    prompts: Sequence[str], edits: Sequence[Edit], row_edits: Sequence[Sequence[Edit]] | None
) -> list[list[Edit]]:
    """One checked edit list per prompt: ``edits`` for every prompt, or ``row_edits`` (one list per prompt)."""
    if row_edits is None:
        return [edit_list(edits)] * len(prompts)
    rows = [edit_list(row, "each entry of row_edits") for row in row_edits]
    if len(rows) != len(prompts):
        raise ArgumentError(f"row_edits has {len(rows)} entries for {len(prompts)} prompts: give one per prompt.")
    return rows


def generate_tokens(
    handle: ModelHandle,
    prompts: Sequence[str],
    edits: Sequence[Edit] = (),
    *,
    row_edits: Sequence[Sequence[Edit]] | None = None,
    config: GenerationConfig = GenerationConfig(),
    chat: bool = True,
    progress: ProgressCallback | None = None,
) -> list[list[int]]:
    """New token ids per prompt (cut at the first end-of-sequence token), in the order of ``prompts``.

    ``edits`` apply to every prompt; ``row_edits`` (one list per prompt) steers each prompt differently.
    On NDIF several batches travel in one request (see ``ModelHandle.batches_per_request``).
    """
    require(handle, ModelHandle, "handle", "Open one with nsteer.open_model.")
    prompts = prompt_list(prompts)
    row_edits = edits_per_row(prompts, edits, row_edits)
    if not isinstance(config, GenerationConfig):
        raise ArgumentError(f"config must be a GenerationConfig, got {type(config).__name__}.")
    batches = generation_batches(
        handle,
        prompts,
        row_edits,
        batch_size=config.batch_size,
        chat=chat,
        max_new_tokens=config.max_new_tokens,
        truncate=config.truncate_prompts,
    )
    eos = eos_ids(handle)
    results: list[list[int]] = [[] for _ in prompts]
    if config.seed is not None:
        torch.manual_seed(config.seed)
    generate_kwargs = config.generate_kwargs(handle.tokenizer.pad_token_id)
    group = handle.batches_per_request("generation")
    done = 0
    if progress is not None:
        progress(0, len(prompts))  # the clock of "elapsed" and "left" starts with the first batch, not after it
    for start in range(0, len(batches), group):
        chunk = batches[start : start + group]
        outputs = steered_generate_batches(
            handle, [(batch.input_ids, batch.attention_mask, batch.plan) for batch in chunk], generate_kwargs
        )
        for batch, tokens in zip(chunk, outputs):
            store_new_tokens(results, batch.rows, batch.input_ids.shape[1], tokens, eos)
        done += sum(len(batch.rows) for batch in chunk)
        if progress is not None:
            progress(done, len(prompts))
    return results


def generate(
    handle: ModelHandle,
    prompts: Sequence[str],
    edits: Sequence[Edit] = (),
    *,
    row_edits: Sequence[Sequence[Edit]] | None = None,
    config: GenerationConfig = GenerationConfig(),
    chat: bool = True,
    progress: ProgressCallback | None = None,
) -> list[str]:
    """Answers to ``prompts`` (chat-templated) with ``edits`` applied; see ``generate_tokens``."""
    tokens = generate_tokens(handle, prompts, edits, row_edits=row_edits, config=config, chat=chat, progress=progress)
    return [handle.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
