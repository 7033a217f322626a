"""Read last-prompt-token activations at every layer through nnsight and turn them into steering vectors."""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nsteer.constants import __version__
from nsteer.errors import ArgumentError, NsteerError, PromptDataError, require
from nsteer.execution.results import expect_tensor
from nsteer.models import ModelHandle, tf32_matmuls
from nsteer.progress import ProgressCallback
from nsteer.prompts import Instruction, PromptPair, prompt_set_hash
from nsteer.vectors import SteeringVector, VectorMetadata


def chat_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as a chat user turn with the generation prompt appended.

    The template is tokenized directly (never rendered to text and re-tokenized), so no second BOS can appear.
    Tokenizers without a chat template get the raw text with their usual special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(encoded, "keys") and "input_ids" in encoded:
            encoded = encoded["input_ids"]
        return [int(token) for token in encoded]
    return [int(token) for token in tokenizer(text, add_special_tokens=True)["input_ids"]]


def shown(text: str, width: int = 70) -> str:
    """``text`` for a message: shortened in the middle when long, quoted, control characters escaped (repr)."""
    if len(text) > width:
        text = f"{text[: width * 2 // 3]} … {text[-(width // 3) :]}"
    return repr(text)


def context_problem(handle: ModelHandle, n_tokens: int, new_tokens: int = 0) -> str | None:
    """Why ``n_tokens`` prompt tokens and ``new_tokens`` new ones overflow the model's context; None if they fit."""
    limit = handle.context_length
    if limit is None or n_tokens + new_tokens <= limit:
        return None
    length = f"is {n_tokens} tokens long (chat template included)"
    if new_tokens:
        length += f" and max_new_tokens is {new_tokens}: {n_tokens + new_tokens} positions"
    return f"{length}, but {handle.model_id} handles at most {limit} positions"


def fitted_token_ids(
    handle: ModelHandle, text: str, *, new_tokens: int = 0, chat: bool = True, truncate: bool = False
) -> list[int]:
    """Token ids of prompt ``text`` (chat-templated unless ``chat`` is False), checked to fit the model's context
    together with ``new_tokens`` generated tokens; a prompt that does not fit is refused with a message naming it.

    With ``truncate`` the prompt's text instead loses its beginning until it fits: the end is kept, where a request
    ends and nsteer appends an instruction. The chat template itself is never cut.
    """
    tokenizer = handle.tokenizer
    encode = (
        (lambda value: chat_token_ids(tokenizer, value)) if chat else (lambda value: raw_token_ids(tokenizer, value))
    )
    ids = encode(text)
    if not ids:
        raise PromptDataError(f"The prompt {shown(text)} has no tokens; give a non-empty prompt.")
    limit = handle.context_length
    if limit is not None and new_tokens >= limit:
        raise PromptDataError(
            f"max_new_tokens {new_tokens} leaves no room for a prompt: {handle.model_id} handles at most {limit} "
            "positions (prompt and generated tokens together). Lower max_new_tokens."
        )
    problem = context_problem(handle, len(ids), new_tokens)
    if problem is None:
        return ids
    if not truncate:
        raise PromptDataError(
            f"The prompt {shown(text)} {problem}. Shorten it, lower max_new_tokens, or let nsteer cut the prompt's "
            "beginning (recipe: generation.truncate_prompts: true; SDK: GenerationConfig(truncate_prompts=True))."
        )
    words = raw_token_ids(tokenizer, text, special=False)
    budget = limit - new_tokens
    keep = budget - (len(ids) - len(words))  # what the template and special tokens take stays
    while keep > 0:
        ids = encode(tokenizer.decode(words[-keep:]))
        if len(ids) <= budget:
            return ids
        keep -= len(ids) - budget  # decoding and re-encoding can merge tokens differently at the cut
    raise PromptDataError(
        f"The prompt {shown(text)} cannot be cut to fit: the chat template alone takes "
        f"{len(encode(''))} of the {budget} positions max_new_tokens {new_tokens} leaves. Lower max_new_tokens."
    )


def raw_token_ids(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """Token ids of ``text`` without a chat template (with the tokenizer's usual special tokens if ``special``)."""
    return [int(token) for token in tokenizer(text, add_special_tokens=special)["input_ids"]]


def chat_template_hash(tokenizer: Any) -> str:
    """A short hash of the tokenizer's chat template ("" when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else ""


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask


def read_pass_kwargs(handle: ModelHandle) -> tuple[dict[str, Any], bool]:
    """Forward keyword arguments for a read-only pass, and whether the trace must stop early instead.

    ``use_cache=False``: one pass needs no KV cache, and building one keeps every layer's keys and values alive to the
    end of the forward (2.5x the peak memory of a 30-layer model's batch). ``logits_to_keep=1``: the LM head runs on
    the last position only (well under 1% of the pass), so no ``tracer.stop()`` is needed; a stop's exception
    keeps the batch's activations alive in a reference cycle until the garbage collector's next full pass, which
    made extraction memory grow with the number of batches. Models whose forward lacks ``logits_to_keep`` stop early.
    """
    try:
        accepted = inspect.signature(handle.hf_model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "logits_to_keep" in accepted:
        return {"use_cache": False, "logits_to_keep": 1}, False
    return {"use_cache": False}, True


ExtractionBatch = tuple[torch.Tensor, torch.Tensor, int]  # input_ids, attention_mask, rows with the instruction first


def last_token_sums(handle: ModelHandle, batches: Sequence[ExtractionBatch]) -> torch.Tensor:
    """Per-layer sums of last-token block outputs over several batches in one session: ``[2, n_layers, H]`` float64.

    Row 0 sums the first ``n_with`` rows of every batch (with the instruction), row 1 the rest. Only the sums leave
    the session, so a remote run downloads ``2 x L x H`` numbers however many prompts it read. The body touches
    only tensors, ints and the model's own modules: it runs on NDIF unchanged (``nsteer.jobs.collect`` reads
    the saved name ``sums``).
    """
    model, layers, n_layers, hidden_size = handle.model, handle.layers, handle.n_layers, handle.hidden_size
    read_kwargs, stop_early = read_pass_kwargs(handle)  # no KV cache; LM head on the last position only
    sums = None  # stays None if a remote result does not carry it (checked below)
    with torch.inference_mode(), tf32_matmuls(handle):
        with model.session(**handle.trace_kwargs()):
            parts = []  # per batch [2, n_layers, H] float64, kept on the model's device: no host sync per layer
            for input_ids, attention_mask, n_with in batches:
                with model.trace({"input_ids": input_ids, "attention_mask": attention_mask}, **read_kwargs) as tracer:
                    states = []
                    for index in range(n_layers):
                        output = layers[index].output
                        hidden = output[0] if isinstance(output, tuple) else output
                        states.append(hidden[:, -1, :])
                    stacked = torch.stack(states).to(torch.float64)  # [n_layers, B, H]
                    parts.append(torch.stack([stacked[:, :n_with].sum(dim=1), stacked[:, n_with:].sum(dim=1)]))
                    if stop_early:
                        tracer.stop()  # skip the final norm and the full LM head (models without logits_to_keep)
            total = parts[0]
            for part in parts[1:]:  # batch after batch, in order
                total = total + part
            sums = total.cpu().save()  # the one copy to the host
    return expect_tensor(sums, "sums", dtype=torch.float64, shape=(2, n_layers, hidden_size))


def extraction_batches(
    handle: ModelHandle, pairs: Sequence[PromptPair], *, batch_size: int = 16
) -> list[ExtractionBatch]:
    """Chat-templated, left-padded batches of ``pairs``: each holds its with-instruction rows, then the without rows."""
    tokenizer = handle.tokenizer
    encoded = [
        (_pair_ids(handle, pair.with_instruction, pair), _pair_ids(handle, pair.without_instruction, pair))
        for pair in pairs
    ]
    # Sorting by length keeps padding small; the sums do not depend on the order of the batches' contents.
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
    pairs_per_batch = max(1, batch_size // 2)
    batches: list[ExtractionBatch] = []
    for start in range(0, len(order), pairs_per_batch):
        chunk = [encoded[i] for i in order[start : start + pairs_per_batch]]
        sequences = [with_ids for with_ids, _ in chunk] + [without_ids for _, without_ids in chunk]
        input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
        batches.append((input_ids, attention_mask, len(chunk)))
    return batches


def _pair_ids(handle: ModelHandle, text: str, pair: PromptPair) -> list[int]:
    """The chat-templated ids of one side of a pair, refused (naming the pair) when they overflow the context."""
    ids = chat_token_ids(handle.tokenizer, text)
    problem = context_problem(handle, len(ids))
    if problem:
        raise PromptDataError(
            f"The prompt pair of base prompt {pair.base_id} {shown(pair.base)} and the phrasing "
            f"{shown(pair.phrasing)}: the prompt {problem}. Shorten that base prompt or phrasing."
        )
    return ids


@dataclass(frozen=True)
class MeanDifference:
    """Per-layer means of the with- and without-instruction activations."""

    mean_with: torch.Tensor  # [n_layers, H] float64
    mean_without: torch.Tensor  # [n_layers, H] float64
    count: int

    @property
    def difference(self) -> torch.Tensor:
        """``u_l``: mean with minus mean without, per layer."""
        return self.mean_with - self.mean_without


def mean_difference(
    handle: ModelHandle,
    pairs: Sequence[PromptPair],
    *,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
) -> MeanDifference:
    """Stream the pairs through the model in batches and keep only running sums (memory independent of the count)."""
    if not pairs:
        raise ArgumentError("mean_difference needs at least one prompt pair.")
    batches = extraction_batches(handle, pairs, batch_size=batch_size)
    sums = torch.zeros(2, handle.n_layers, handle.hidden_size, dtype=torch.float64)
    group = handle.batches_per_request("extraction")
    done = 0
    for start in range(0, len(batches), group):
        chunk = batches[start : start + group]
        sums += last_token_sums(handle, chunk)
        done += sum(n_with for _, _, n_with in chunk)
        if progress is not None:
            progress(done, len(pairs))
    return MeanDifference(sums[0] / len(pairs), sums[1] / len(pairs), len(pairs))


def direction_statistics(statistics: MeanDifference) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit directions ``û_l`` [L, H], mean projections ``z_l`` [L] and raw norms ``‖u_l‖`` [L], all fp32."""
    difference = statistics.difference
    norms = difference.norm(dim=-1)
    broken = [layer for layer, norm in enumerate(norms.tolist()) if not 0 < norm < math.inf]
    if broken or not torch.isfinite(statistics.mean_with).all():
        # Identical activations (or non-finite ones) give no direction; saving one would steer with garbage.
        raise NsteerError(
            f"No direction can be computed at layer(s) {broken[:10] or 'all'}: the prompts with and without the "
            "instruction gave identical or non-finite activations there. Check the phrasings and the model."
        )
    directions = difference / norms.clamp_min(1e-12)[:, None]
    mean_projections = (statistics.mean_with * directions).sum(dim=-1)
    return directions.to(torch.float32), mean_projections.to(torch.float32), norms.to(torch.float32)


def compute_vector(
    handle: ModelHandle,
    instruction: Instruction,
    pairs: Sequence[PromptPair],
    *,
    batch_size: int = 16,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> SteeringVector:
    """Compute the steering vector of ``instruction`` from training ``pairs`` on ``handle``'s model."""
    require(handle, ModelHandle, "handle", "Open one with nsteer.open_model.")
    if not isinstance(instruction, Instruction):
        raise ArgumentError(
            f"instruction must be an Instruction (e.g. nsteer.builtin_instruction), got {instruction!r}."
        )
    if not isinstance(pairs, Sequence) or not all(isinstance(pair, PromptPair) for pair in pairs):
        raise ArgumentError(
            "pairs must be a list of PromptPair, e.g. nsteer.instruction_pairs(instruction).train "
            f"(got {type(pairs).__name__})."
        )
    if not pairs:
        raise NsteerError(f"No training pairs for '{instruction.id}': the train split is empty. Add base prompts.")
    statistics = mean_difference(handle, pairs, batch_size=batch_size, progress=progress)
    directions, mean_projections, norms = direction_statistics(statistics)
    return SteeringVector(directions, mean_projections, norms, vector_metadata(handle, instruction, pairs, seed=seed))


def vector_metadata(
    handle: ModelHandle, instruction: Instruction, pairs: Sequence[PromptPair], *, seed: int = 0
) -> VectorMetadata:
    """The metadata of ``instruction``'s vector computed from ``pairs`` on ``handle``'s model."""
    return VectorMetadata(
        nsteer_version=__version__,
        model_id=handle.model_id,
        config_hash=handle.config_hash,
        weights_fingerprint=handle.weights_fingerprint,
        architecture=handle.architecture,
        hidden_size=handle.hidden_size,
        n_layers=handle.n_layers,
        instruction_id=instruction.id,
        category=instruction.category,
        description=instruction.description,
        check_id=instruction.check_id,
        check_kwargs=dict(instruction.check_kwargs),
        phrasings=tuple(sorted({pair.phrasing for pair in pairs})),
        prompt_set_hash=prompt_set_hash(pairs),
        n_pairs=len(pairs),
        chat_template_hash=chat_template_hash(handle.tokenizer),
        seed=seed,
    )
