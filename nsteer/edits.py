"""Edit specifications and their compilation into a plan of plain tensors that steers every row of a batch at once.

The composition rule lives here and only here: edits are applied layer by layer in forward order; edits that share a
layer are applied one after another in the order given (the recipe's order), each to the residual stream as the
previous one left it, so their effects add and a later ``set`` sees what an earlier ``add`` did.

One formula covers every mode: ``h <- h + (a (t - h.u) + b) u`` with ``set``: a = w, t = z; ``add``: a = 0, b = w;
``ablate``: a = w, t = 0 (zeros elsewhere). Three optional modifiers act on that change ``d = a (t - h.u) + b``:

- a gate (threshold g on a direction v): at the prefill, a row whose last prompt token has ``h.v >= g`` (before this
  edit) is left unedited for the whole generation: one decision per row, made inside the trace;
- a clamp (bound c): ``d <- min(d, max(c - h.u, 0))``: the edit never lifts the projection above c;
- skip-first: each row's first token (the attention sink: its states are orders of magnitude larger) is left alone.

The plan holds, per layer, a ``LayerPlan`` of per-row tensors:

- ``directions [K, H]``: the distinct unit directions used at the layer (float32);
- ``index [S, B]``: which of them row ``b``'s ``s``-th edit at this layer uses;
- ``target [S, B]`` (t), and ``scale [2, S, B]`` (a) and ``shift [2, S, B]`` (b) for the prompt (the prefill,
  step 0) and for generated tokens (later steps): positions ``prompt`` / ``generated`` zero one of the two;
- ``gate_index [S, B]`` (into directions) and ``gate [S, B]`` (g, +inf: no gate), ``bound [S, B]`` (c, +inf: no
  clamp) and ``skip_first [S, B]`` (1: leave the row's first token alone).

Slot ``s`` holds every row's ``s``-th edit at the layer, so one fused update per slot steers all rows, each with its
own direction, mode, weight and positions, and a row with fewer edits there gets a = b = 0 (left exactly as it was).
The number of slots is the most edits any one row has at that layer: the cost per step does not grow with the number
of rows or of distinct settings. Sequential slots keep the rule exact for edits whose directions are not orthogonal.

Extending an edit family means adding a per-row tensor to ``LayerPlan`` (and its use to the trace body in
``nsteer.generate``, which sees ``LayerPlan.payload()``: a dict of plain tensors, so it pickles for NDIF).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nsteer.constants import MODES, POSITIONS
from nsteer.errors import ArgumentError, NsteerError, require
from nsteer.limits import MAX_CLAMP, MAX_LAYERS, is_finite_number
from nsteer.searched import options_words
from nsteer.vectors import SteeringVector

PROMPT, GENERATED = 0, 1  # the two phases of a generation: the prefill (step 0) and each later step


@dataclass(frozen=True, eq=False)
class Edit:
    """One residual-stream edit at one layer.

    ``set``: h ← h + w (target − h·û) û; ``add``: h ← h + w û; ``ablate``: h ← h − w (h·û) û.
    """

    layer: int
    direction: torch.Tensor  # [H], unit norm
    mode: str = "set"
    weight: float = 1.0
    target: float = 0.0  # the mean projection z_l, used by ``set``
    positions: str = "all"  # all | prompt (the prefill) | generated (tokens produced by the model)
    name: str = ""
    gate: float | None = None  # edit the row only if h.v at its last prompt token (before this edit) is below this
    gate_direction: torch.Tensor | None = None  # v [H], unit norm; None: the edit's own direction
    bound: float | None = None  # clamp: the edit never lifts h.u above this
    skip_first: bool = False  # leave each row's first token (the attention sink) as it is

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ArgumentError(f"Unknown edit mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.positions not in POSITIONS:
            raise ArgumentError(f"Unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}.")
        if not isinstance(self.layer, numbers.Integral) or isinstance(self.layer, bool) or self.layer < 0:
            raise ArgumentError(f"An edit's layer must be a layer number, 0 or more, got {self.layer!r}.")
        for name in ("weight", "target"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ArgumentError(f"An edit's {name} must be a finite number, got {_show(value)}.")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "layer", int(self.layer))
        if not isinstance(self.direction, torch.Tensor) or not self.direction.is_floating_point():
            raise ArgumentError(f"An edit's direction must be a float tensor [H], got {type(self.direction).__name__}.")
        if self.direction.dim() != 1:
            raise ArgumentError(f"An edit's direction must be one vector [H], got shape {tuple(self.direction.shape)}.")
        if not _fits_float32(self.direction):  # the plan holds directions in float32
            raise ArgumentError(
                f"The direction of edit '{self.name}' holds NaN, infinite or float32-overflowing values."
            )
        for field, value in (("gate", self.gate), ("bound", self.bound)):
            if value is None:
                continue
            if not is_finite_number(value):
                raise ArgumentError(f"Edit '{self.name}': the {field} must be a finite number, got {_show(value)}.")
            object.__setattr__(self, field, float(value))
        if self.gate_direction is not None:
            gate_direction = self.gate_direction
            if not isinstance(gate_direction, torch.Tensor) or not gate_direction.is_floating_point():
                raise ArgumentError(f"Edit '{self.name}': the gate direction must be a float tensor [H].")
            if gate_direction.shape != self.direction.shape:
                raise ArgumentError(
                    f"Edit '{self.name}': the gate direction has shape {tuple(gate_direction.shape)}, the edit's "
                    f"direction {tuple(self.direction.shape)}; give both as one vector [H] of the model's width."
                )
            if not _fits_float32(gate_direction):
                raise ArgumentError(
                    f"Edit '{self.name}': the gate direction holds NaN, infinite or float32-overflowing values."
                )
        if not isinstance(self.skip_first, bool):
            raise ArgumentError(f"Edit '{self.name}': skip_first must be true or false, got {self.skip_first!r}.")

    def coefficients(self) -> tuple[float, float, float, float, float]:
        """``(t, a_prompt, b_prompt, a_generated, b_generated)`` of ``h <- h + (a (t - h.u) + b) u``."""
        if self.mode == "set":
            target, scale, shift = self.target, self.weight, 0.0
        elif self.mode == "add":
            target, scale, shift = 0.0, 0.0, self.weight
        else:
            target, scale, shift = 0.0, self.weight, 0.0
        on_prompt = self.positions in ("all", "prompt")
        on_generated = self.positions in ("all", "generated")
        return (
            target,
            scale if on_prompt else 0.0,
            shift if on_prompt else 0.0,
            scale if on_generated else 0.0,
            shift if on_generated else 0.0,
        )


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """Every row's edits at one layer, as per-row tensors (see the module docstring for the formula and shapes)."""

    layer: int
    directions: torch.Tensor  # [K, H] float32, the distinct directions at this layer
    index: torch.Tensor  # [S, B] int64 into directions
    target: torch.Tensor  # [S, B] float32: t
    scale: torch.Tensor  # [2, S, B] float32: a at the prompt (0) and at generated steps (1)
    shift: torch.Tensor  # [2, S, B] float32: b, likewise
    gate_index: torch.Tensor  # [S, B] int64 into directions: the gate's direction v
    gate: torch.Tensor  # [S, B] float32: the gate threshold g (+inf: not gated)
    bound: torch.Tensor  # [S, B] float32: the clamp bound c (+inf: not clamped)
    skip_first: torch.Tensor  # [S, B] float32: 1 leaves the row's first token alone

    @property
    def slots(self) -> int:
        """How many sequential updates this layer needs per step (the most edits one row has here)."""
        return int(self.index.shape[0])

    def payload(self) -> dict[str, object]:
        """The plain form the trace body reads (only ints and tensors: it pickles by value for NDIF)."""
        return {
            "layer": self.layer,
            "directions": self.directions,
            "index": self.index,
            "target": self.target,
            "scale": self.scale,
            "shift": self.shift,
            "gate_index": self.gate_index,
            "gate": self.gate,
            "bound": self.bound,
            "skip_first": self.skip_first,
            # Flags so that a plan without gates, clamps or skipped tokens costs nothing extra per step.
            "gated": bool(torch.isfinite(self.gate).any()),
            "clamped": bool(torch.isfinite(self.bound).any()),
            "skips": bool(self.skip_first.any()),
        }


Plan = tuple[LayerPlan, ...]


def edit_from_vector(
    vector: SteeringVector,
    *,
    layer: int | None = None,
    mode: str | None = None,
    weight: float | None = None,
    positions: str | None = None,
    target_scale: float | None = None,
) -> Edit:
    """Build an Edit from a vector at one layer; unset arguments fall back to the vector's searched choice.

    ``weight`` is absolute (see :func:`relative_weight` for one on the vector's scale); ``target_scale`` k makes a
    ``set`` edit's target k × z_l.
    """
    require(vector, SteeringVector, "vector", "Load one with nsteer.load_vector or compute one.")
    chosen = vector.metadata.chosen
    if chosen is not None and chosen.options_label and (layer is None or weight is None):
        # One Edit cannot carry a block, gate, clamp or centered direction: taking only the layer and weight would
        # steer differently from what was searched (a block's whole weight at its first layer, no gate).
        raise ArgumentError(
            f"'{vector.instruction_id}' was searched with {chosen.options_label}, which one Edit cannot hold: use "
            "nsteer.vector_edits(vector, layer=..., options=nsteer.EditOptions(...)), or give layer and weight."
        )
    layer = layer if layer is not None else (chosen.layer if chosen else None)
    if layer is None:
        raise ArgumentError(
            f"No layer given for '{vector.instruction_id}' and the vector has no searched layer. "
            "Give a layer or run `nsteer search` first."
        )
    n_layers = vector.directions.shape[0]
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ArgumentError(
            f"Layer {layer} is out of range for '{vector.instruction_id}': the model has layers 0..{n_layers - 1}."
        )
    mode = mode or (chosen.mode if chosen else "set")
    if mode == "set" and vector.metadata.imported_from:
        raise ArgumentError(
            f"'{vector.instruction_id}' was imported ({vector.metadata.imported_from}) "
            "and carries no mean projection z_l, so a `set` edit is undefined. "
            "Use mode add (weight = the file's scale at that layer, see `nsteer inspect`) or ablate."
        )
    if float(vector.norms[layer]) == 0.0 and vector.metadata.imported_from:
        raise ArgumentError(
            f"'{vector.instruction_id}' has no direction at layer {layer}; the imported file holds layers "
            f"{[i for i in range(n_layers) if float(vector.norms[i]) > 0]}."
        )
    return Edit(
        layer=int(layer),
        direction=vector.directions[layer],
        mode=mode,
        weight=float(weight if weight is not None else (chosen.weight if chosen else 1.0)),
        target=float(target_scale if target_scale is not None else (chosen.target_scale if chosen else 1.0))
        * float(vector.mean_projections[layer]),
        positions=positions or (chosen.positions if chosen else "all"),
        name=vector.instruction_id,
    )


@dataclass(frozen=True)
class EditOptions:
    """How a vector's edit is shaped beyond layer, mode, weight and positions (every option off by default).

    All statistics come from the vector's training pairs: z_l (the mean projection with the instruction) and
    ‖u_l‖ (the distance between the means with and without it), so the mean without it projects at z_l − ‖u_l‖.
    """

    block: int = 1  # the edit at `block` consecutive layers from its layer, the weight split evenly between them
    gate: float | None = None  # m: edit a row only if its last prompt token projects below z_l − m ‖u_l‖
    clamp: float | None = None  # c: the edit never lifts the projection above z_l + c ‖u_l‖
    skip_first: bool = False  # leave each row's first token (the attention sink) alone
    centered: bool = False  # steer along u_l minus the mean vector of a set of instructions (the specific part)

    def __post_init__(self) -> None:
        if (
            isinstance(self.block, bool)
            or not isinstance(self.block, numbers.Integral)
            or not 1 <= self.block <= MAX_LAYERS
        ):
            raise ArgumentError(
                f"block must be a whole number of layers, 1 or more (at most {MAX_LAYERS}); got {_show(self.block)}."
            )
        object.__setattr__(self, "block", int(self.block))
        if self.gate is not None and not (is_finite_number(self.gate) and 0 <= self.gate <= 1):
            raise ArgumentError(
                f"gate must be a number from 0 to 1 (0.5: midway between the training means), got {_show(self.gate)}."
            )
        if self.clamp is not None and not (is_finite_number(self.clamp) and -MAX_CLAMP <= self.clamp <= MAX_CLAMP):
            raise ArgumentError(
                f"clamp must be a finite number from {-MAX_CLAMP:g} to {MAX_CLAMP:g} (0: the bound is z_l), "
                f"got {_show(self.clamp)}."
            )
        for name in ("gate", "clamp"):  # plain floats, like Edit's numbers (a Fraction cannot be formatted as :g)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if not isinstance(self.skip_first, bool) or not isinstance(self.centered, bool):
            raise ArgumentError("skip_first and centered must be true or false.")
        if self.centered and self.clamp is not None:
            raise ArgumentError(
                "clamp needs the projection statistics of the edit's own direction; a centered direction has none. "
                "Use clamp with the vector's own direction."
            )

    @property
    def label(self) -> str:
        """The options that are on, in words (empty when none is)."""
        return options_words(self.block, self.gate, self.clamp, self.skip_first, self.centered)


def _is_number(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fits_float32(tensor: torch.Tensor) -> bool:
    """Every value finite and within float32's range (a float64 1e39 is finite, and inf once the plan casts it)."""
    return bool(torch.isfinite(tensor).all()) and (
        tensor.numel() == 0 or float(tensor.detach().abs().max()) <= torch.finfo(torch.float32).max
    )


def _show(value: object) -> str:
    """A bad value quoted briefly (a 400-digit integer stays one short line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def mean_vector(vectors: Sequence[SteeringVector]) -> torch.Tensor:
    """The mean raw difference vector ``mean_J u_J`` per layer ``[L, H]``: what a set of instructions shares."""
    require(vectors, (list, tuple), "vectors", "Give a list of SteeringVectors (nsteer.load_vector).")
    for item in vectors:
        require(item, SteeringVector, "each of vectors", "Give a list of SteeringVectors (nsteer.load_vector).")
    if len(vectors) < 3:
        raise NsteerError(
            f"A centered direction needs the vectors of 3 or more instructions, got {len(vectors)} "
            "(with two, the two centered directions are opposite)."
        )
    shapes = {tuple(vector.directions.shape) for vector in vectors}
    if len(shapes) > 1:
        raise NsteerError(f"Vectors of different shapes {sorted(shapes)} cannot be centered together.")
    return torch.stack([vector.directions.float() * vector.norms.float()[:, None] for vector in vectors]).mean(0)


def _needs_statistics(vector: SteeringVector, what: str) -> None:
    """Refuse an option that needs the training statistics z_l on an imported vector (which has none)."""
    if vector.metadata.imported_from:
        raise NsteerError(
            f"'{vector.instruction_id}' was imported ({vector.metadata.imported_from}) and carries no mean projection "
            f"z_l, so {what} is undefined. Compute the vector with `nsteer compute` to use it."
        )


def vector_edits(
    vector: SteeringVector,
    *,
    layer: int,
    mode: str,
    weight: float,
    positions: str,
    weight_relative: float | None = None,
    target_scale: float = 1.0,
    options: EditOptions = EditOptions(),
    center: torch.Tensor | None = None,
) -> list[Edit]:
    """A vector's edits at ``layer`` (and the next ``options.block - 1`` layers) with ``options`` applied.

    A block splits the weight evenly: each of its n layers gets ``weight / n`` (or ``k / n × ‖u_l‖`` at its own layer
    for a ``weight_relative`` k). ``center`` ([L, H], see :func:`mean_vector`) is required with ``options.centered``.
    """
    require(vector, SteeringVector, "vector", "Load one with nsteer.load_vector or compute one.")
    n_layers = vector.directions.shape[0]
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ArgumentError(
            f"layer must be a layer number of '{vector.instruction_id}' (0..{n_layers - 1}), got {_show(layer)}."
        )
    require(options, EditOptions, "options", "Build them with nsteer.EditOptions(...).")
    if weight_relative is not None and not is_finite_number(weight_relative):
        raise ArgumentError(f"weight_relative must be a finite number or None, got {_show(weight_relative)}.")
    if center is not None and not (
        isinstance(center, torch.Tensor) and center.is_floating_point() and _fits_float32(center)
    ):
        raise ArgumentError(
            "center must be a float tensor [L, H] of finite values (nsteer.mean_vector), "
            f"got {_show(center) if not isinstance(center, torch.Tensor) else 'a tensor of ' + str(center.dtype)}."
        )
    layer = int(layer)
    layers = range(layer, layer + options.block)
    if layers[-1] >= n_layers:
        raise NsteerError(
            f"A block of {options.block} layers from layer {layer} ends at layer {layers[-1]}; the model has layers "
            f"0..{n_layers - 1}. Start the block at layer {n_layers - options.block} or earlier."
        )
    if options.gate is not None or options.clamp is not None:
        _needs_statistics(vector, "a gate or clamp")
    if options.centered:
        if mode == "set":
            raise NsteerError(
                "A set edit needs the mean projection on its own direction; a centered direction has none. "
                "Use mode add (or ablate) with a centered direction."
            )
        if center is None or tuple(center.shape) != tuple(vector.directions.shape):
            raise NsteerError("A centered edit needs the mean vector of its instruction set (nsteer.mean_vector).")
    edits = []
    for at in layers:
        share = (
            relative_weight(vector, at, weight_relative / options.block)
            if weight_relative is not None
            else weight / options.block
        )
        edit = edit_from_vector(
            vector, layer=at, mode=mode, weight=share, positions=positions, target_scale=target_scale
        )
        z, norm, own = float(vector.mean_projections[at]), float(vector.norms[at]), vector.directions[at]
        changes: dict[str, object] = {"skip_first": options.skip_first}
        if options.centered:
            specific = own.float() * norm - center[at].float()
            length = float(specific.norm())
            if not math.isfinite(length):  # a center far past the vector's scale (a float32 norm overflows)
                raise NsteerError(f"'{vector.instruction_id}' at layer {at}: the centered direction overflows float32.")
            if not length > 0.0:
                raise NsteerError(
                    f"'{vector.instruction_id}' at layer {at} equals the mean vector of its set: no specific part."
                )
            changes["direction"] = specific / length
        if options.gate is not None:
            changes.update(gate=z - options.gate * norm, gate_direction=own)
        if options.clamp is not None:
            changes["bound"] = z + options.clamp * norm  # |c| <= MAX_CLAMP: finite for any float32 norm
        edits.append(dataclasses.replace(edit, **changes))
    return edits


def relative_weight(vector: SteeringVector, layer: int, k: float) -> float:
    """The absolute weight ``k × ‖u_l‖``: k times the raw norm of the vector's mean difference at ``layer``."""
    return float(k) * float(vector.norms[layer])


def validate_edits(edits: Sequence[Edit], *, n_layers: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
    """Refuse edits whose layer or width does not fit the model, or whose weight overflows the model's ``dtype``."""
    largest = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else None
    for edit in edits:
        if largest is not None and max(abs(edit.weight), abs(edit.weight * edit.target)) > largest:
            kind = str(dtype).removeprefix("torch.")
            raise ArgumentError(
                f"Edit '{edit.name}' has weight {edit.weight:g}: its change overflows the model's {kind} (largest "
                f"{largest:.4g}) and would turn its activations into inf and NaN. Use a smaller weight."
            )
        if not 0 <= edit.layer < n_layers:
            raise ArgumentError(
                f"Edit '{edit.name}' targets layer {edit.layer}; this model has layers 0..{n_layers - 1}."
            )
        if edit.direction.shape[0] != hidden_size:
            raise ArgumentError(
                f"Edit '{edit.name}' has width {edit.direction.shape[0]} but the model's width is {hidden_size}."
            )


def _direction_index(vector: torch.Tensor, directions: list[torch.Tensor], known: dict[bytes, int]) -> int:
    """The index of ``vector`` in ``directions`` (appended the first time it is seen; equal directions stored once)."""
    direction = vector.detach().to("cpu", torch.float32).contiguous()
    key = direction.numpy().tobytes()
    if key not in known:
        known[key] = len(directions)
        directions.append(direction)
    return known[key]


def compile_plan(row_edits: Sequence[Sequence[Edit]]) -> Plan:
    """Turn per-row edit lists into a layer-sorted plan of per-row tensors (one ``LayerPlan`` per edited layer).

    Row ``b``'s edits at a layer fill slots 0, 1, ... in that row's own list order, so rows that list shared edits in
    different orders, or one edit twice, are each applied exactly as listed. Equal directions are stored once.
    """
    batch_size = len(row_edits)
    by_layer: dict[int, list[list[Edit]]] = {}
    for row, edits in enumerate(row_edits):
        for edit in edits:
            by_layer.setdefault(edit.layer, [[] for _ in range(batch_size)])[row].append(edit)
    plan: list[LayerPlan] = []
    for layer in sorted(by_layer):
        rows = by_layer[layer]
        slots = max(len(edits) for edits in rows)
        directions: list[torch.Tensor] = []
        known: dict[bytes, int] = {}
        index = torch.zeros(slots, batch_size, dtype=torch.long)
        target = torch.zeros(slots, batch_size, dtype=torch.float32)
        scale = torch.zeros(2, slots, batch_size, dtype=torch.float32)
        shift = torch.zeros(2, slots, batch_size, dtype=torch.float32)
        gate_index = torch.zeros(slots, batch_size, dtype=torch.long)
        gate = torch.full((slots, batch_size), math.inf, dtype=torch.float32)
        bound = torch.full((slots, batch_size), math.inf, dtype=torch.float32)
        skip_first = torch.zeros(slots, batch_size, dtype=torch.float32)

        for row, edits in enumerate(rows):
            for slot, edit in enumerate(edits):
                index[slot, row] = _direction_index(edit.direction, directions, known)
                if edit.gate is not None:
                    gate_direction = edit.gate_direction if edit.gate_direction is not None else edit.direction
                    gate_index[slot, row] = _direction_index(gate_direction, directions, known)
                    gate[slot, row] = edit.gate
                if edit.bound is not None:
                    bound[slot, row] = edit.bound
                skip_first[slot, row] = float(edit.skip_first)
                t, a_prompt, b_prompt, a_generated, b_generated = edit.coefficients()
                target[slot, row] = t
                scale[PROMPT, slot, row], shift[PROMPT, slot, row] = a_prompt, b_prompt
                scale[GENERATED, slot, row], shift[GENERATED, slot, row] = a_generated, b_generated
        plan.append(
            LayerPlan(layer, torch.stack(directions), index, target, scale, shift, gate_index, gate, bound, skip_first)
        )
    return tuple(plan)
