"""Circuit shift: how much the components that carry the answer differ between two conditions.

An *effect map* holds one number per component of the model: the mean patching effect of every
attention head (``heads``, ``[L, H]``), of every MLP (``mlp``, ``[L]``) and of the residual stream
of every layer (``residual``, ``[L]``). Two conditions (base 0-shot, base k-shot, a fine-tuned
checkpoint) are compared map kind by map kind (docs/method.md §7.7):

- ``shift = 1 - spearman(a, b)`` over the flattened maps: 0 when the components rank alike, 1 when
  the ranks are unrelated, 2 when they are reversed. Spearman is Pearson's correlation of the
  ranks, ties given their average rank (as ``scipy.stats.spearmanr``); a constant map has no
  ranking, so its correlation and shift are NaN (``null`` in JSON), never a made-up number.
- ``overlap = |top-k(a) ∩ top-k(b)| / k``, the top-k taken by absolute effect (``by="abs"``, the
  default: a head that pushes the answer strongly the wrong way is part of the circuit too) or by
  signed effect (``by="signed"``). Ties are broken by the flat index (lower layer, then lower head
  first), so the sets are deterministic.
- ``entered`` / ``left``: the components in b's top-k that are not in a's, and the reverse, as
  ``(layer, head)`` tuples for heads and layer ints for MLP and residual maps, in b's (resp. a's)
  rank order.

Pure numpy/scipy: no torch, so the analysis of stored effects runs anywhere.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

from replandscape.errors import UserError

By = Literal["abs", "signed"]
BY_CHOICES: tuple[str, ...] = ("abs", "signed")
MAP_KINDS: tuple[str, ...] = ("heads", "mlp", "residual")
DEFAULT_TOP_K = 10
Component = tuple[int, int] | int


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties).

    Returns NaN when either vector is constant (its ranks have no spread).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman of vectors of {x.size} and {y.size} values")
    if x.size < 2:
        return math.nan
    rx = rankdata(x) - (x.size + 1) / 2.0
    ry = rankdata(y) - (y.size + 1) / 2.0
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0.0:
        return math.nan
    # clipped: rounding can carry a perfect correlation a hair past +-1
    return float(np.clip(float(rx @ ry) / denom, -1.0, 1.0))


def rank_shift(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - spearman(a, b)`` over the flattened maps: 0 alike, 2 reversed, NaN if constant."""
    return 1.0 - spearman(a, b)


def _check_by(by: str) -> None:
    if by not in BY_CHOICES:
        raise UserError(f"unknown top-k ordering '{by}'", key="circuits.by",
                        fix=f"use one of {', '.join(BY_CHOICES)}")


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise UserError(f"top-k of {k!r} components asked of a map with {n}", key="circuits.top_k",
                        fix=f"use an integer k between 1 and {n}")


def topk_indices(values: np.ndarray, k: int, by: str = "abs") -> np.ndarray:
    """Flat indices of the k largest components (by ``|value|`` or by value), largest first;
    ties go to the lower flat index."""
    _check_by(by)
    flat = np.asarray(values, dtype=np.float64).ravel()
    _check_k(k, flat.size)
    score = np.abs(flat) if by == "abs" else flat
    # a stable sort of -score keeps equal scores in index order
    return np.argsort(-score, kind="stable")[:k]


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int, by: str = "abs") -> float:
    """``|top-k(a) ∩ top-k(b)| / k``."""
    _same_shape(a, b)
    ta, tb = set(topk_indices(a, k, by).tolist()), set(topk_indices(b, k, by).tolist())
    return len(ta & tb) / k


def _component(flat_index: int, shape: tuple[int, ...]) -> Component:
    if len(shape) == 1:
        return int(flat_index)
    layer, head = np.unravel_index(flat_index, shape)
    return int(layer), int(head)


def topk_changes(a: np.ndarray, b: np.ndarray, k: int,
                 by: str = "abs") -> tuple[list[Component], list[Component]]:
    """(entered, left): components in b's top-k and not a's, and in a's and not b's.

    Components are ``(layer, head)`` for a 2-D map and the layer for a 1-D one, each list in the
    rank order of the map it comes from.
    """
    _same_shape(a, b)
    shape = tuple(np.asarray(a).shape)
    ta, tb = topk_indices(a, k, by).tolist(), topk_indices(b, k, by).tolist()
    entered = [_component(i, shape) for i in tb if i not in set(ta)]
    left = [_component(i, shape) for i in ta if i not in set(tb)]
    return entered, left


def _same_shape(a: np.ndarray, b: np.ndarray, what: str = "the two effect maps") -> None:
    sa, sb = np.asarray(a).shape, np.asarray(b).shape
    if sa != sb:
        raise UserError(f"{what} have shapes {list(sa)} and {list(sb)}", key="circuits",
                        fix="compare conditions of the same model (same layers and heads)")
    if len(sa) not in (1, 2):
        raise ValueError(f"an effect map is [L] or [L, H], not {list(sa)}")
    for m in (a, b):
        if not np.all(np.isfinite(np.asarray(m, dtype=np.float64))):
            raise ValueError("an effect map holds NaN or infinite values: average finite effects")


@dataclass(frozen=True)
class EffectMaps:
    """The mean effect of every component in one condition (any map may be absent).

    Attributes:
        heads: ``[L, H]``, attention heads.
        mlp: ``[L]``, MLP outputs.
        residual: ``[L]``, the residual stream of each layer.
    """

    heads: np.ndarray | None = None
    mlp: np.ndarray | None = None
    residual: np.ndarray | None = None

    def maps(self) -> dict[str, np.ndarray]:
        """The present maps by kind, in ``MAP_KINDS`` order."""
        found = {kind: getattr(self, kind) for kind in MAP_KINDS}
        return {kind: np.asarray(m, dtype=np.float64) for kind, m in found.items()
                if m is not None}


@dataclass(frozen=True)
class CircuitShift:
    """How one map kind differs between two conditions."""

    condition_a: str
    condition_b: str
    kind: str
    n_components: int
    spearman: float
    shift: float
    k: int
    by: str
    overlap: float
    entered: list[Component] = field(default_factory=list)
    left: list[Component] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        def comp(c: Component) -> int | list[int]:
            return list(c) if isinstance(c, tuple) else c

        return {"condition_a": self.condition_a, "condition_b": self.condition_b,
                "kind": self.kind, "n_components": self.n_components,
                "spearman": num(self.spearman), "shift": num(self.shift), "k": self.k,
                "by": self.by, "overlap": self.overlap,
                "entered": [comp(c) for c in self.entered],
                "left": [comp(c) for c in self.left]}


def circuit_shift(a: np.ndarray, b: np.ndarray, *, k: int = DEFAULT_TOP_K, by: str = "abs",
                  condition_a: str = "a", condition_b: str = "b",
                  kind: str = "heads") -> CircuitShift:
    """Every shift measure of one map kind between conditions a and b.

    ``k`` is capped at the number of components, so a small model's MLP map (fewer layers than
    k) is compared over all its components rather than refused.
    """
    _same_shape(a, b, f"the '{kind}' maps of '{condition_a}' and '{condition_b}'")
    n = int(np.asarray(a).size)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"top-k of {k!r} components asked", key="circuits.top_k",
                        fix="use a positive integer k")
    k_used = min(k, n)
    rho = spearman(a, b)
    entered, left = topk_changes(a, b, k_used, by)
    return CircuitShift(condition_a=condition_a, condition_b=condition_b, kind=kind,
                        n_components=n, spearman=rho, shift=1.0 - rho, k=k_used, by=by,
                        overlap=topk_overlap(a, b, k_used, by), entered=entered, left=left)


def compare_maps(a: EffectMaps, b: EffectMaps, *, k: int = DEFAULT_TOP_K, by: str = "abs",
                 condition_a: str = "a", condition_b: str = "b") -> list[CircuitShift]:
    """One :class:`CircuitShift` per map kind both conditions have."""
    ma, mb = a.maps(), b.maps()
    return [circuit_shift(ma[kind], mb[kind], k=k, by=by, condition_a=condition_a,
                          condition_b=condition_b, kind=kind)
            for kind in MAP_KINDS if kind in ma and kind in mb]


def pairwise_shift(maps: Mapping[str, EffectMaps], *, k: int = DEFAULT_TOP_K,
                   by: str = "abs") -> list[CircuitShift]:
    """Every unordered pair of conditions (in the mapping's order: a before b), every map kind."""
    out: list[CircuitShift] = []
    for (name_a, a), (name_b, b) in itertools.combinations(maps.items(), 2):
        out.extend(compare_maps(a, b, k=k, by=by, condition_a=name_a, condition_b=name_b))
    return out


def shifts_to_json(shifts: Sequence[CircuitShift]) -> list[dict[str, Any]]:
    return [s.to_json() for s in shifts]
