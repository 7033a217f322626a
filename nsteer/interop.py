"""Interoperability with llama.cpp control vectors: export an nsteer vector to their GGUF, import one back.

The format (written and read with the ``gguf`` package, never by hand) is what llama.cpp's ``--control-vector`` and
repeng's ``ControlVector.export_gguf`` use: ``general.architecture = "controlvector"``, the keys
``controlvector.model_hint`` (a string naming the model) and ``controlvector.layer_count`` (how many direction tensors
the file holds), and one 1-D float32 tensor ``direction.N`` of the model's width per steered layer.

**Which layer is ``direction.N``.** N is llama.cpp's (0-based) block index and starts at 1, because block 0 can carry
no direction; it equals nsteer's layer index (the output of decoder block N, Hugging Face's ``hidden_states[N + 1]``):

- ``common_control_vector_load_one`` (llama.cpp ``common/common.cpp``) parses N from the tensor name, refuses N = 0,
  and stores ``direction.N`` at buffer offset ``n_embd * (N - 1)`` ("layer 1 at [0]");
- ``llama_adapter_cvec::apply`` (``src/llama-adapter.cpp``) fills ``tensors[il]`` from offset ``n_embd * (il - 1)``
  for ``il = 1 .. n_layer - 1``: the two ``- 1`` cancel, so block ``il`` gets ``direction.il``;
- each model graph adds it to the block output (``cur = build_cvec(cur, il); cb(cur, "l_out", il);`` after the FFN
  residual add, e.g. ``src/models/llama.cpp``): the residual stream after block ``il``, nsteer's read and edit site.
- repeng agrees: it reads ``hidden_states[layer + 1]`` for its 0-based ``layer`` and writes ``direction.{layer}``.

llama.cpp only *adds* (``h ← h + s · direction.N`` at every position, ``s`` the ``--control-vector-scaled`` strength),
so an export writes what an nsteer ``add`` edit of weight ``w`` adds: ``w · û_N``. A ``set`` edit depends on the
hidden state and has no llama.cpp equivalent. An import keeps each tensor's unit direction and its norm as the scale
(``norms``); it has no mean projection, so the vector is marked ``imported_from`` and ``set`` edits of it are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nsteer.constants import __version__
from nsteer.edits import Edit
from nsteer.errors import ArgumentError, NsteerError, VectorFileError, require
from nsteer.fileio import MIB, atomic_write, parse_json, require_file
from nsteer.limits import MAX_LAYERS, MAX_WIDTH, is_finite_number
from nsteer.models import ModelHandle
from nsteer.searched import SearchedSetting
from nsteer.vectors import SteeringVector, VectorMetadata

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
NSTEER_KEY = "nsteer.source"  # JSON: where the vector came from, and how it was scaled
MAX_SOURCE_CHARS = 1 << 20  # the nsteer.source JSON an export writes is about 1 KB
MAX_CONTROL_VECTOR_BYTES = MAX_LAYERS * MAX_WIDTH * 4 + 16 * MIB  # the largest control vector nsteer describes
DIRECTION_PREFIX = "direction."
GGUF_MAGIC = b"GGUF"
FLOAT32_MAX = float(np.finfo(np.float32).max)
LAYER_SUFFIX = re.compile(r"[1-9][0-9]{0,5}")  # direction.N: ASCII digits, no leading zero (one name per layer)


@dataclass(frozen=True)
class ControlVectorFile:
    """A llama.cpp control vector as read from its GGUF: per-layer float32 tensors and the file's metadata."""

    path: Path
    directions: Mapping[int, np.ndarray]  # llama.cpp block index N (= nsteer layer) -> [H] float32, scale included
    model_hint: str
    layer_count: int | None
    nsteer: Mapping[str, Any]  # the nsteer.source record when nsteer wrote the file, else {}

    @property
    def hidden_size(self) -> int:
        """The width every direction tensor has."""
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> list[int]:
        """The layers the file steers, ascending."""
        return sorted(self.directions)


def parse_layers(text: str) -> list[int]:
    """``"8,10"`` -> ``[8, 10]`` (ascending, no duplicates); a clear error for anything else."""
    try:
        layers = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ArgumentError(f"--layers {text!r} is not a comma-separated list of layer numbers (e.g. 8,10).") from None
    if not layers:
        raise ArgumentError("--layers is empty: give the layer numbers to export, e.g. --layers 8,10.")
    if len(set(layers)) != len(layers):
        raise ArgumentError(f"--layers {text!r} names a layer twice.")
    return sorted(layers)


def export_weight_and_layers(
    vector: SteeringVector, layers: Sequence[int] | None, weight: float | None
) -> tuple[list[int], float]:
    """The layers and weight to export: the ones given, else the vector's searched ``add`` setting."""
    chosen = vector.metadata.chosen
    if (layers is None or weight is None) and chosen is not None and chosen.options_label:
        # llama.cpp adds w·u at every token of each layer: a gate, clamp, skip-first or centered direction is lost,
        # and a block's weight is split over its layers; exporting the searched layer and weight would differ.
        raise ArgumentError(
            f"'{vector.instruction_id}' was searched with {chosen.options_label}, which a llama.cpp control vector "
            "cannot express (it adds weight x direction at every token of each layer). Give --layers and --weight "
            "to export a plain add, and check it with `nsteer generate`."
        )
    if layers is None:
        if chosen is None or chosen.layer is None:
            raise ArgumentError(
                f"'{vector.instruction_id}' has no searched layer: pass --layers (e.g. --layers 8 or --layers 8,10)."
            )
        layers = [chosen.layer]
    if weight is None:
        if chosen is None or chosen.no_steering or chosen.mode != "add":
            raise ArgumentError(
                "Give --weight: llama.cpp can only add a direction (h <- h + w*u), "
                f"and '{vector.instruction_id}' has no "
                f"searched add weight (its searched mode is {chosen.mode if chosen else 'none'!r}). "
                "For a set-mode vector, "
                "choose an add weight that moves the projection by about what set does (e.g. z_l minus a typical "
                "unsteered projection) and check it with `nsteer generate`."
            )
        weight = chosen.weight
    if not is_finite_number(weight) or weight == 0:
        shown = repr(weight) if len(repr(weight)) <= 60 else repr(weight)[:57] + "..."
        raise ArgumentError(f"--weight must be a finite, non-zero number, got {shown}.")
    if abs(weight) > FLOAT32_MAX:  # weight x unit direction must stay finite in the file's float32
        raise ArgumentError(
            f"--weight {weight:g} overflows float32, the type of llama.cpp control vectors (at most {FLOAT32_MAX:.4g})."
        )
    n_layers = vector.metadata.n_layers
    for layer in layers:
        if layer == 0:
            raise ArgumentError(
                "llama.cpp cannot steer layer 0: its control vectors start at block 1 (direction.1); "
                "pick layers 1 or more."
            )
        if not 0 < layer < n_layers:
            raise ArgumentError(
                f"Layer {layer} is out of range: '{vector.instruction_id}' has layers 0..{n_layers - 1}."
            )
    return sorted(layers), float(weight)


def export_llama_cpp(
    vector: SteeringVector,
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    weight: float | None = None,
) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF: ``direction.l = weight · û_l`` for each of ``layers``.

    Defaults come from the vector's searched ``add`` setting. The file is written atomically (temporary file, rename).
    """
    import gguf

    require(vector, SteeringVector, "vector", "Load one with nsteer.load_vector.")
    layers, weight = export_weight_and_layers(vector, layers, weight)
    meta = vector.metadata
    source = {
        "format": "nsteer.llama-cpp/1",
        "nsteer_version": meta.nsteer_version,
        "model_id": meta.model_id,
        "architecture": meta.architecture,
        "config_hash": meta.config_hash,
        "weights_fingerprint": meta.weights_fingerprint,
        "hidden_size": meta.hidden_size,
        "n_layers": meta.n_layers,
        "instruction_id": meta.instruction_id,
        "category": meta.category,
        "check_id": meta.check_id,
        "check_kwargs": dict(meta.check_kwargs),
        "layers": layers,
        "weight": weight,
        "mode": "add",
        "positions": "all",
    }

    def write(temporary: Path) -> None:
        writer = gguf.GGUFWriter(str(temporary), ARCHITECTURE)
        writer.add_name(f"{meta.instruction_id} ({meta.model_id})")
        writer.add_string(MODEL_HINT_KEY, meta.model_id)
        writer.add_uint32(LAYER_COUNT_KEY, len(layers))
        writer.add_string(NSTEER_KEY, json.dumps(source, sort_keys=True))
        for layer in layers:
            scaled = (weight * vector.directions[layer].detach().to("cpu", torch.float64)).to(torch.float32)
            writer.add_tensor(f"{DIRECTION_PREFIX}{layer}", scaled.numpy().copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = atomic_write(path, write)
    return path


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_control_vector(path: str | Path) -> ControlVectorFile:
    """Read and validate a llama.cpp control-vector GGUF; every defect is a VectorFileError that names it."""
    import gguf

    require(path, (str, os.PathLike), "path")
    path = require_file(path, "control vector file", VectorFileError)
    with path.open("rb") as stream:
        magic = stream.read(4)
    if magic != GGUF_MAGIC:
        raise VectorFileError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); give a llama.cpp control vector."
        )
    size = path.stat().st_size
    if size > MAX_CONTROL_VECTOR_BYTES:  # every float32 tensor is copied out: a model GGUF would be read whole
        raise VectorFileError(
            f"{path} is {size:,} bytes; a control vector holds at most {MAX_LAYERS} layers x {MAX_WIDTH} float32 "
            f"values ({MAX_CONTROL_VECTOR_BYTES // MIB} MiB with its metadata). Is it a model GGUF? Give a llama.cpp "
            "control vector."
        )
    try:
        reader = gguf.GGUFReader(str(path))
        architecture = _field(reader, "general.architecture")
        model_hint = _field(reader, MODEL_HINT_KEY)
        layer_count = _field(reader, LAYER_COUNT_KEY)
        source_text = _field(reader, NSTEER_KEY)
        tensors = [
            (
                tensor.name,
                int(tensor.tensor_type),
                [int(d) for d in tensor.shape],
                int(tensor.n_elements),
                np.array(tensor.data, dtype=np.float32, copy=True).reshape(-1)
                if int(tensor.tensor_type) == 0
                else None,
            )
            for tensor in reader.tensors
        ]
    except Exception as error:  # the reader raises ValueError / IndexError / struct errors on a broken file
        raise VectorFileError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {type(error).__name__}: {error}). "
            "Copy or export it again."
        ) from None
    if architecture != ARCHITECTURE:
        raise VectorFileError(
            f"{path} is a GGUF file of architecture {architecture!r}, not a llama.cpp control vector "
            f"(architecture {ARCHITECTURE!r}). A model file cannot be imported as a vector."
        )
    directions: dict[int, np.ndarray] = {}
    for name, tensor_type, shape, n_elements, data in tensors:
        if not name.startswith(DIRECTION_PREFIX):
            continue
        suffix = name[len(DIRECTION_PREFIX) :]
        if not LAYER_SUFFIX.fullmatch(suffix) or not 0 < int(suffix) < MAX_LAYERS:
            raise VectorFileError(
                f"{path}: tensor {name!r} is not direction.N with a layer N from 1 to {MAX_LAYERS - 1}."
            )
        if int(suffix) in directions:
            raise VectorFileError(f"{path}: the file holds two tensors for layer {int(suffix)}.")
        if tensor_type != 0 or data is None:
            raise VectorFileError(
                f"{path}: tensor {name!r} is not float32 (ggml type {tensor_type}); llama.cpp needs F32."
            )
        if len(shape) != 1:
            raise VectorFileError(f"{path}: tensor {name!r} has shape {shape}; a direction is one vector [H].")
        if data.shape[0] != n_elements:
            raise VectorFileError(f"{path}: tensor {name!r} is truncated ({data.shape[0]} of {n_elements} values).")
        if not np.isfinite(data).all():
            raise VectorFileError(f"{path}: tensor {name!r} holds NaN or infinite values.")
        directions[int(suffix)] = data
    if not directions:
        raise VectorFileError(f"{path}: the file holds no direction.N tensors, so there is nothing to import.")
    widths = {data.shape[0] for data in directions.values()}
    if len(widths) > 1:
        raise VectorFileError(f"{path}: the direction tensors have different widths {sorted(widths)}.")
    nsteer = _source_record(source_text, path) if source_text is not None else {}
    hidden = widths.pop()
    if nsteer.get("hidden_size") not in (None, hidden):
        raise VectorFileError(f"{path}: its tensors have width {hidden} but its metadata says {nsteer['hidden_size']}.")
    beyond = [layer for layer in directions if layer >= nsteer.get("n_layers", MAX_LAYERS)]
    if beyond:
        raise VectorFileError(
            f"{path}: it steers layer(s) {sorted(beyond)} but its metadata says the model has {nsteer['n_layers']} "
            "layers; export it again."
        )
    if layer_count is not None and (not _is_int(layer_count) or not 0 <= layer_count < MAX_LAYERS):
        raise VectorFileError(f"{path}: {LAYER_COUNT_KEY} is {shown_value(layer_count)}, not a layer count.")
    if model_hint is not None and not isinstance(model_hint, str):
        raise VectorFileError(f"{path}: {MODEL_HINT_KEY} is {shown_value(model_hint)}, not a model name.")
    return ControlVectorFile(path, directions, model_hint or "", layer_count, nsteer)


# The fields of the nsteer.source record an export writes, and what each must be on import; others are ignored.
_SOURCE_FIELDS: dict[str, Any] = {
    **{
        name: str
        for name in (
            "format",
            "nsteer_version",
            "model_id",
            "architecture",
            "config_hash",
            "weights_fingerprint",
            "instruction_id",
            "category",
            "check_id",
            "mode",
            "positions",
        )
    },
    "hidden_size": "width",
    "n_layers": "depth",
    "check_kwargs": dict,
    "layers": "layers",
    "weight": "number",
}


def _source_record(text: Any, path: Path) -> dict[str, Any]:
    """The nsteer.source JSON of an exported file, every known field type-checked: it decides what gets allocated
    (``n_layers`` x width floats), so a claim the file cannot back is refused, never trusted."""
    if isinstance(text, str) and len(text) > MAX_SOURCE_CHARS:  # an export writes about 1 KB
        raise VectorFileError(
            f"{path}: the {NSTEER_KEY} metadata is {len(text):,} characters (an export writes about a kilobyte; at "
            f"most {MAX_SOURCE_CHARS:,} are read); export the vector again."
        )
    try:
        data = parse_json(text) if isinstance(text, str) else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise VectorFileError(f"{path}: the {NSTEER_KEY} metadata is not a JSON object; export the vector again.")
    for name, kind in _SOURCE_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        valid = {
            str: lambda v: isinstance(v, str) and len(v) <= 10_000,
            dict: lambda v: isinstance(v, dict),
            "width": lambda v: _is_int(v) and 0 < v <= MAX_WIDTH,
            "depth": lambda v: _is_int(v) and 0 < v <= MAX_LAYERS,
            "layers": lambda v: isinstance(v, list) and all(_is_int(i) and 0 <= i < MAX_LAYERS for i in v),
            "number": is_finite_number,
        }[kind](value)
        if not valid:
            expected = {
                str: "a string",
                dict: "an object",
                "width": f"a width from 1 to {MAX_WIDTH}",
                "depth": f"a layer count from 1 to {MAX_LAYERS}",
                "layers": "a list of layer numbers",
                "number": "a finite number",
            }[kind]
            raise VectorFileError(
                f"{path}: the {NSTEER_KEY} field {name} is {shown_value(value)}, not {expected}; "
                "export the vector again."
            )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown_value(value: Any) -> str:
    """A value from a file for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def import_llama_cpp(
    path: str | Path,
    *,
    handle: ModelHandle | None = None,
    model_id: str | None = None,
    n_layers: int | None = None,
    instruction_id: str | None = None,
) -> SteeringVector:
    """Read a llama.cpp control vector into a SteeringVector (unit directions, norms = the file's scale, z = 0).

    The model identity comes from the metadata nsteer wrote into the file, else from ``handle`` (a foreign file is
    taken to be for the model it is imported for), else from ``model_id`` / ``n_layers`` (identity then unknown, so
    loading it needs transfer). A ``handle`` is always checked: width and depth must fit.
    """
    control = read_control_vector(path)
    source = control.nsteer
    hidden = control.hidden_size
    if handle is not None and handle.hidden_size != hidden:
        raise VectorFileError(
            f"{control.path} has width {hidden} but {handle.model_id} has width {handle.hidden_size}: "
            "it was made for another model."
        )
    if source:  # written by nsteer: the file says which model it was computed on (loading elsewhere needs transfer)
        identity = {
            key: source.get(key, "") for key in ("model_id", "config_hash", "weights_fingerprint", "architecture")
        }
        identity["n_layers"] = int(source.get("n_layers") or 0)
        if handle is not None and handle.n_layers != identity["n_layers"]:
            raise VectorFileError(
                f"{control.path} was made for {identity['model_id']} ({identity['n_layers']} layers) but "
                f"{handle.model_id} has {handle.n_layers} layers."
            )
    elif handle is not None:  # a foreign file: the model it is imported for is all we know
        identity = dict(
            model_id=handle.model_id,
            config_hash=handle.config_hash,
            weights_fingerprint=handle.weights_fingerprint,
            architecture=handle.architecture,
            n_layers=handle.n_layers,
        )
    else:
        identity = dict(
            model_id=model_id or control.model_hint,
            config_hash="",
            weights_fingerprint="",
            architecture="",
            n_layers=n_layers or 0,
        )
        if not identity["model_id"] or not identity["n_layers"]:
            raise NsteerError(
                f"{control.path} does not say which model it is for (width {hidden}, layers {control.layers}): "
                "give the model (--model-id, which opens it to check the width and depth)."
            )
    depth = int(identity["n_layers"])
    beyond = [layer for layer in control.layers if layer >= depth]
    if beyond:
        raise VectorFileError(
            f"{control.path} steers layer(s) {beyond} but {identity['model_id']} has layers 0..{depth - 1}: "
            "it was made for another model."
        )
    directions = torch.zeros(depth, hidden, dtype=torch.float32)
    norms = torch.zeros(depth, dtype=torch.float32)
    for layer, data in control.directions.items():
        tensor = torch.from_numpy(data.astype(np.float64))
        norm = float(tensor.norm())
        if norm > FLOAT32_MAX:  # every value finite, but the length is not: it cannot be stored or applied
            raise VectorFileError(
                f"{control.path}: direction.{layer} has length {norm:.3g}, beyond float32 ({FLOAT32_MAX:.3g})."
            )
        if norm > 0:
            directions[layer] = (tensor / norm).to(torch.float32)
            norms[layer] = norm
    layers = [layer for layer in control.layers if norms[layer] > 0]
    if not layers:
        raise VectorFileError(f"{control.path}: every direction tensor is zero.")
    name = instruction_id or source.get("instruction_id") or control.path.stem
    first = layers[0]
    metadata = VectorMetadata(
        nsteer_version=__version__,
        model_id=str(identity["model_id"]),
        config_hash=str(identity["config_hash"]),
        weights_fingerprint=str(identity["weights_fingerprint"]),
        architecture=str(identity["architecture"]),
        hidden_size=hidden,
        n_layers=depth,
        instruction_id=name,
        category=str(source.get("category") or "imported"),
        description=(
            f"llama.cpp control vector {control.path.name} (layers {layers}; model hint {control.model_hint!r})"
        ),
        check_id=str(source.get("check_id") or ""),
        check_kwargs=dict(source.get("check_kwargs") or {}),
        read_site="block_output",
        token_position="unknown (imported)",
        # What llama.cpp does at strength 1 on the first layer: add the file's tensor (norm x unit direction).
        chosen=SearchedSetting(
            layer=first, mode="add", weight=float(norms[first]), positions="all", layers=tuple(layers), imported=True
        ),
        imported_from=f"llama.cpp control vector {control.path.name}",
    )
    return SteeringVector(directions, torch.zeros(depth, dtype=torch.float32), norms, metadata)


def control_vector_edits(vector: SteeringVector, *, strength: float = 1.0, positions: str = "all") -> list[Edit]:
    """What llama.cpp does with an imported vector at ``strength``: an ``add`` edit per layer, weight strength*norm."""
    layers = [layer for layer in range(vector.directions.shape[0]) if float(vector.norms[layer]) > 0]
    return [
        Edit(
            layer=layer,
            direction=vector.directions[layer],
            mode="add",
            weight=strength * float(vector.norms[layer]),
            positions=positions,
            name=vector.instruction_id,
        )
        for layer in layers
    ]


__all__ = [
    "ControlVectorFile",
    "control_vector_edits",
    "export_llama_cpp",
    "import_llama_cpp",
    "parse_layers",
    "read_control_vector",
]
