"""Edit specifications and their compilation into a plan of plain tensors and numbers.

The composition rule lives here and only here: edits are applied layer by layer in forward order; edits that share a
layer are applied one after another in the order given (the recipe's order), each to the residual stream as the
previous one left it, so their effects add and a later ``set`` sees what an earlier ``add`` did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nsteer.constants import MODES, POSITIONS
from nsteer.errors import NsteerError
from nsteer.vectors import SteeringVector

# A plan is what the trace body sees: ``[(layer, [(mode, direction[H], target, row_weights[B], positions), ...]), ...]``
# with integer codes for mode and positions, so it can be pickled and run on a server that has no nsteer.
PlanEntry = tuple[int, torch.Tensor, float, torch.Tensor, int]
Plan = list[tuple[int, list[PlanEntry]]]


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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NsteerError(f"Unknown edit mode '{self.mode}'; use one of {', '.join(MODES)}.")
        if self.positions not in POSITIONS:
            raise NsteerError(f"Unknown positions '{self.positions}'; use one of {', '.join(POSITIONS)}.")
        if self.direction.dim() != 1:
            raise NsteerError(f"An edit's direction must be one vector [H], got shape {tuple(self.direction.shape)}.")


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
    chosen = vector.metadata.chosen
    layer = layer if layer is not None else (chosen.layer if chosen else None)
    if layer is None:
        raise NsteerError(
            f"No layer given for '{vector.instruction_id}' and the vector has no searched layer. "
            "Give a layer or run `nsteer search` first."
        )
    n_layers = vector.directions.shape[0]
    if not 0 <= layer < n_layers:
        raise NsteerError(
            f"Layer {layer} is out of range for '{vector.instruction_id}': the model has layers 0..{n_layers - 1}."
        )
    mode = mode or (chosen.mode if chosen else "set")
    if mode == "set" and vector.metadata.imported_from:
        raise NsteerError(
            f"'{vector.instruction_id}' was imported ({vector.metadata.imported_from}) "
            "and carries no mean projection z_l, so a `set` edit is undefined. "
            "Use mode add (weight = the file's scale at that layer, see `nsteer inspect`) or ablate."
        )
    if float(vector.norms[layer]) == 0.0 and vector.metadata.imported_from:
        raise NsteerError(
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


def relative_weight(vector: SteeringVector, layer: int, k: float) -> float:
    """The absolute weight ``k × ‖u_l‖``: k times the raw norm of the vector's mean difference at ``layer``."""
    return float(k) * float(vector.norms[layer])


def validate_edits(edits: Sequence[Edit], *, n_layers: int, hidden_size: int) -> None:
    """Refuse edits whose layer or width does not fit the model."""
    for edit in edits:
        if not 0 <= edit.layer < n_layers:
            raise NsteerError(
                f"Edit '{edit.name}' targets layer {edit.layer}; this model has layers 0..{n_layers - 1}."
            )
        if edit.direction.shape[0] != hidden_size:
            raise NsteerError(
                f"Edit '{edit.name}' has width {edit.direction.shape[0]} but the model's width is {hidden_size}."
            )


def compile_plan(row_edits: Sequence[Sequence[Edit]]) -> Plan:
    """Turn per-row edit lists into a layer-sorted plan of plain tensors.

    Each plan entry is one edit in one slot; its ``row_weights`` hold the edit's weight on the rows that carry it there
    and 0 elsewhere, so one batched pass can steer every row differently (or not at all). Within a layer the slots
    hold every row's edits as a subsequence in that row's own order, so rows that list shared edits in different
    orders, or one edit twice, are each applied exactly as listed.
    """
    batch_size = len(row_edits)
    slots: dict[int, list[tuple[Edit, set[int]]]] = {}
    for row, edits in enumerate(row_edits):
        cursor: dict[int, int] = {}  # per layer: the first slot this row may still use
        for edit in edits:
            layer_slots = slots.setdefault(edit.layer, [])
            start = cursor.get(edit.layer, 0)
            index = next((i for i in range(start, len(layer_slots)) if layer_slots[i][0] is edit), None)
            if index is None:
                layer_slots.append((edit, set()))
                index = len(layer_slots) - 1
            layer_slots[index][1].add(row)
            cursor[edit.layer] = index + 1
    plan: Plan = []
    for layer in sorted(slots):
        entries: list[PlanEntry] = []
        for edit, rows in slots[layer]:
            row_weights = torch.tensor(
                [edit.weight if row in rows else 0.0 for row in range(batch_size)], dtype=torch.float32
            )
            entries.append(
                (
                    MODES.index(edit.mode),
                    edit.direction.detach().to(torch.float32).cpu(),
                    float(edit.target),
                    row_weights,
                    POSITIONS.index(edit.positions),
                )
            )
        plan.append((layer, entries))
    return plan
