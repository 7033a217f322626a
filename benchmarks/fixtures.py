"""What the benchmark sections run on: models (with an unwrapped twin), inputs, edits, and the forward-hook baseline.

The tokenizer and tiny configs are the test suite's own (``tests/tiny.py``). Models of real shapes are randomly
initialised from configs written out here, on the device itself: timing does not depend on the weights' values, and
no model file has to exist (a GPU machine may have none).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from tiny import tiny_config, tiny_tokenizer  # noqa: E402  (the tests' tokenizer and tiny configs)

INSTRUCTION = "lowercase"
MODEL_KINDS = ("embedded", "tiny", "smollm2-shape", "llama-8b-shape")

# Real shapes, written out so that no model file is needed. The embedded model's (SmolLM2-135M-Instruct) and
# Llama-3.1-8B's (its rope scaling left out: it changes no cost).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-8b-shape": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True, eq=False)
class BenchModel:
    """A benchmark model: the nsteer handle, and an identical Hugging Face model that nnsight never wrapped."""

    handle: Any  # nsteer ModelHandle
    plain: Any  # the unwrapped twin: the physical limit's baseline
    kind: str
    description: str


def shaped_config(kind: str, tokenizer: Any) -> Any:
    """The Llama config of a real-shape kind, with the tokenizer's special tokens."""
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        **SHAPES[kind], eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, pad_token_id=eos, initializer_range=0.02
    )


def random_model(config: Any, device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A randomly initialised causal LM from ``config``, built directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def deep_narrow_config(layers: int) -> Any:
    """A width-64 Llama of ``layers`` layers (the tests' tiny config): little compute per step, so fixed costs show."""
    config = tiny_config("llama", layers=layers)
    config.initializer_range = 0.1
    return config


def open_bench_model(kind: str, device: str, dtype: str = "auto") -> BenchModel:
    """A ``BenchModel`` of ``kind`` (see MODEL_KINDS) on ``device``; ``dtype`` as in ``nsteer.open_model``."""
    from nsteer.constants import EMBEDDED_ID
    from nsteer.models import _load_local, resolve_device, resolve_dtype

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if kind == "embedded":
        tokenizer, model = _load_local(EMBEDDED_ID, torch_dtype, target, None)
        return _twins(model, tokenizer, EMBEDDED_ID, kind, "SmolLM2-135M-Instruct (embedded GGUF)")
    tokenizer = tiny_tokenizer()
    if kind == "tiny":
        return open_deep_narrow(4, target, torch_dtype)
    if kind not in SHAPES:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    config = shaped_config(kind, tokenizer)
    description = (
        f"random Llama of {kind.removesuffix('-shape')}'s shape (width {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}), the tests' tokenizer"
    )
    model = random_model(config, target, torch_dtype)
    with torch.no_grad():  # ids the tokenizer cannot decode get logit 0, below the best of the others': text comes out
        model.get_output_embeddings().weight[len(tokenizer) :] = 0
    return _twins(model, tokenizer, f"bench-{kind}", kind, description)


def open_deep_narrow(layers: int, device: str, dtype: torch.dtype = torch.float32) -> BenchModel:
    """The tests' tiny Llama (width 64) with ``layers`` layers, as a ``BenchModel``."""
    model = random_model(deep_narrow_config(layers), device, dtype)
    return _twins(
        model, tiny_tokenizer(), f"bench-deep-narrow-{layers}", "tiny", f"random Llama, width 64, {layers} layers"
    )


def _twins(model: Any, tokenizer: Any, model_id: str, kind: str, description: str) -> BenchModel:
    """The handle around ``model`` and an unwrapped copy made before nnsight wraps it."""
    from nsteer.models import wrap_model

    plain = copy.deepcopy(model).eval()
    return BenchModel(wrap_model(model.eval(), tokenizer, model_id=model_id), plain, kind, description)


def benchmark_pairs(count: int) -> list[Any]:
    """``count`` pairs of the built-in base prompts with the lowercase phrasings (cycled when count > prompts)."""
    from nsteer.prompts import builtin_instruction, load_base_prompts, make_pairs

    base = load_base_prompts("builtin:base-v1")
    pairs = list(make_pairs(base[: min(count, len(base))], builtin_instruction(INSTRUCTION).phrasings, seed=0))
    return [pairs[index % len(pairs)] for index in range(count)]


def base_prompts(count: int) -> list[str]:
    """The first ``count`` built-in base prompts."""
    from nsteer.prompts import load_base_prompts

    return [p.text for p in load_base_prompts("builtin:base-v1")[:count]]


def generation_inputs(handle: Any, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` base prompts, chat-templated and left-padded exactly as nsteer does it."""
    from nsteer.extract import chat_token_ids, left_pad

    input_ids, attention_mask = left_pad(
        [chat_token_ids(handle.tokenizer, p) for p in base_prompts(batch_size)], handle.tokenizer.pad_token_id
    )
    return input_ids.to(device), attention_mask.to(device)


def edit_layers(n_layers: int, count: int) -> list[int]:
    """``count`` distinct layers spread evenly over the model's depth (one edit: the middle layer)."""
    return [min(n_layers - 1, (n_layers * (index + 1)) // (count + 1)) for index in range(count)]


def quick_vector(handle: Any, pairs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and mean projections from a few pairs."""
    from nsteer.extract import direction_statistics, mean_difference

    directions, mean_projections, _ = direction_statistics(mean_difference(handle, benchmark_pairs(pairs)))
    return directions, mean_projections


def set_edits(vector: tuple[torch.Tensor, torch.Tensor], layers: Sequence[int]) -> list[Any]:
    """``set`` edits (weight 1, all positions) with the benchmark's direction at each of ``layers``."""
    from nsteer.edits import Edit

    directions, mean_projections = vector
    return [
        Edit(layer=layer, direction=directions[layer], mode="set", weight=1.0, target=float(mean_projections[layer]))
        for layer in layers
    ]


def distinct_row_edits(vector: tuple[torch.Tensor, torch.Tensor], layer: int, rows: int) -> list[list[Any]]:
    """One edit per row at ``layer``, every row's setting different (a search sweep's shape): modes, weights,
    positions and, for every third row, a direction of its own."""
    from nsteer.edits import Edit

    directions, mean_projections = vector
    base = directions[layer]
    result = []
    for row in range(rows):
        generator = torch.Generator().manual_seed(row)
        own = base + 0.5 * torch.randn(base.shape, generator=generator) / base.shape[0] ** 0.5
        direction = own / own.norm() if row % 3 == 2 else base
        mode = ("set", "add", "ablate")[row % 3]
        weight = 0.5 + 0.05 * row if mode != "add" else 2.0 + 0.25 * row
        positions = ("all", "generated", "prompt", "all")[row % 4]
        target = float(mean_projections[layer]) * (1 + 0.01 * row)
        result.append(
            [Edit(layer=layer, direction=direction, mode=mode, weight=weight, target=target, positions=positions)]
        )
    return result


class HookEdits:
    """The same ``set`` edits as plain PyTorch forward hooks on a model's decoder blocks (the baseline edit path).

    The arithmetic is nsteer's (``h + (c - a (h.u)) u`` with ``a = w``, ``c = w z`` in the model dtype), so both paths
    generate the same tokens in any dtype; the work per step is one hook call and four tensor ops per edit.
    """

    def __init__(self, model: Any, layers_path: str, edits: Sequence[Any]) -> None:
        self.blocks = model.get_submodule(layers_path)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.edits = edits
        self.handles: list[Any] = []

    def _hook(self, edit: Any) -> Callable:
        unit = edit.direction.to(self.device, self.dtype)
        column = unit[:, None]
        scale = torch.tensor(edit.weight, dtype=torch.float32).to(self.device, self.dtype)
        weight, target = (torch.tensor(value, dtype=torch.float32) for value in (edit.weight, edit.target))
        offset = (weight * target).to(self.device, self.dtype)

        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            edited = hidden.addcmul(torch.addcmul(offset, scale, torch.matmul(hidden, column), value=-1), unit)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def __enter__(self) -> HookEdits:
        for edit in self.edits:
            self.handles.append(self.blocks[edit.layer].register_forward_hook(self._hook(edit)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
