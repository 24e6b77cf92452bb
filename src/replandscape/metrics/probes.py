"""Cross-validated linear probes of one site's representations, with control tasks.

A probe predicts an item label from the item's representation at one site: a logistic regression
for a categorical label (accuracy), a ridge regression for a numeric one (R^2). Scores are pooled
over the out-of-fold predictions of ``folds``-fold cross-validation (stratified by class for
categorical labels, shuffled with the seed); each dimension is standardised with the training
fold's mean and deviation. The control task is the same probe on the same representations with
the labels shuffled over the items (seeded): it keeps the label distribution and destroys the
link to the representation, so it shows what the probe scores by capacity alone. Selectivity is
the real score minus the control score. "Parameterized probing" scores a probe of a target within
each value (or quantile bin) of a task parameter, e.g. the R^2 of y at each slope.

scikit-learn does the fitting; folds, shuffling, pooling and the control are ours.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from replandscape.errors import UserError

Kind = Literal["classification", "regression"]


@dataclass(frozen=True)
class ProbeParams:
    """Choices of the probes.

    Attributes:
        folds: Cross-validation folds (stratified by class for categorical labels).
        seed: Seed of the fold assignment and of the control task's shuffle.
        C: Inverse L2 strength of the logistic regression.
        alphas: Ridge strengths; the ridge picks one inside each training fold by efficient
            leave-one-out (generalised cross-validation).
        max_iter: Iterations of the logistic regression's L-BFGS solver.
        standardize: Standardise each dimension with the training fold's statistics.
        threads: Cap on BLAS/OpenMP threads (None leaves them as they are).
    """

    folds: int = 5
    seed: int = 0
    C: float = 1.0
    alphas: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    max_iter: int = 1000
    standardize: bool = True
    threads: int | None = None


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """One probe of one label at one site.

    Attributes:
        task: The task.
        label: The probed label.
        kind: ``classification`` (score: accuracy) or ``regression`` (score: R^2).
        score: Pooled out-of-fold accuracy or R^2.
        control: The same on the control task (labels shuffled over the items).
        selectivity: ``score - control``.
        chance: Accuracy of always answering the most frequent class; 0 for R^2 (the mean).
        n_items: Items probed.
        n_classes: Classes of a categorical label (0 for regression).
        fold_scores: The score of each fold.
    """

    task: str
    label: str
    kind: str
    score: float
    control: float
    selectivity: float
    chance: float
    n_items: int
    n_classes: int
    fold_scores: tuple[float, ...] = field(default_factory=tuple)

    def to_json_dict(self) -> dict[str, Any]:
        return {"task": self.task, "label": self.label, "kind": self.kind,
                "metric": "accuracy" if self.kind == "classification" else "r2",
                "score": _num(self.score), "control": _num(self.control),
                "selectivity": _num(self.selectivity), "chance": _num(self.chance),
                "n_items": self.n_items, "n_classes": self.n_classes,
                "fold_scores": [_num(v) for v in self.fold_scores]}


@dataclass(frozen=True, eq=False)
class ParameterizedProbe:
    """A probe of ``label`` within each bin of ``parameter``.

    Attributes:
        task, label, parameter: What was probed, against what.
        bins: Bin names (the parameter's values, or ``[low, high]`` quantile ranges).
        probes: The probe of each bin.
    """

    task: str
    label: str
    parameter: str
    bins: tuple[str, ...]
    probes: tuple[ProbeResult, ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {"task": self.task, "label": self.label, "parameter": self.parameter,
                "bins": list(self.bins), "probes": [p.to_json_dict() for p in self.probes]}


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# one probe
# --------------------------------------------------------------------------------------------


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _out_of_fold(x: np.ndarray, y: np.ndarray, kind: Kind, p: ProbeParams
                 ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Out-of-fold predictions of every item, and the folds' (train, test) index arrays."""
    if kind == "classification":
        splitter: StratifiedKFold | KFold = StratifiedKFold(p.folds, shuffle=True,
                                                            random_state=p.seed)
    else:
        splitter = KFold(p.folds, shuffle=True, random_state=p.seed)
    folds = list(splitter.split(x, y))
    predicted = np.empty(len(y), dtype=y.dtype if kind == "classification" else np.float64)
    for train, test in folds:
        xtr, xte = x[train], x[test]
        if p.standardize:
            xtr, xte = _standardize(xtr, xte)
        if kind == "classification":
            if len(np.unique(y[train])) == 1:  # nothing to learn: every item has one class
                predicted[test] = y[train][0]
                continue
            model: LogisticRegression | RidgeCV = LogisticRegression(C=p.C, max_iter=p.max_iter)
        else:
            model = RidgeCV(alphas=p.alphas)
        model.fit(xtr, y[train])
        predicted[test] = model.predict(xte)
    return predicted, folds


def _score(y: np.ndarray, predicted: np.ndarray, kind: Kind) -> float:
    if kind == "classification":
        return float(np.mean(y == predicted))
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0:
        return float("nan")
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total


def _check(x: np.ndarray, y: np.ndarray, kind: Kind, p: ProbeParams, task: str,
           label: str) -> None:
    if x.ndim != 2 or x.shape[0] != len(y):
        raise UserError(f"task '{task}': {len(y)} values of label '{label}' for representations "
                        f"of shape {x.shape}", key=label, fix="give one label per item")
    if p.folds < 2:
        raise UserError(f"task '{task}': probes need at least 2 folds, got {p.folds}",
                        key="probes.folds", fix="use folds >= 2")
    if kind == "classification":
        values, counts = np.unique(y, return_counts=True)
        small = [(v, int(c)) for v, c in zip(values, counts) if c < p.folds]
        if small:
            v, c = small[0]
            raise UserError(f"task '{task}': condition '{v}' of label '{label}' has {c} items, "
                            f"fewer than the probe's {p.folds} folds", key="probes.folds",
                            fix=f"use at most {c} folds, or more items per condition")
    elif len(y) < p.folds:
        raise UserError(f"task '{task}': label '{label}' has {len(y)} items, fewer than the "
                        f"probe's {p.folds} folds", key="probes.folds",
                        fix=f"use at most {len(y)} folds, or more items")


def probe(x: np.ndarray, y: Sequence[Any] | np.ndarray, *, kind: Kind, task: str, label: str,
          params: ProbeParams | None = None) -> ProbeResult:
    """Cross-validated linear probe of ``y`` from ``x`` and its control task.

    Args:
        x: ``[N, D]`` representations.
        y: ``N`` labels (any comparable values for classification, numbers for regression).
        kind: ``classification`` or ``regression``.
        task, label: For messages and the result.
        params: The choices; defaults when None.

    Raises:
        UserError: Lengths differ, fewer than 2 folds, or a class (condition) with fewer items
            than folds.
    """
    p = params or ProbeParams()
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(y) if kind == "classification" else np.asarray(y, dtype=np.float64)
    _check(x, target, kind, p, task, label)
    with threadpool_limits(limits=p.threads):
        predicted, folds = _out_of_fold(x, target, kind, p)
        # the control: the same label structure on shuffled items
        shuffled = target[np.random.default_rng(p.seed).permutation(len(target))]
        control_predicted, _ = _out_of_fold(x, shuffled, kind, p)
    score = _score(target, predicted, kind)
    control = _score(shuffled, control_predicted, kind)
    fold_scores = tuple(_score(target[test], predicted[test], kind) for _, test in folds)
    if kind == "classification":
        _, counts = np.unique(target, return_counts=True)
        chance, n_classes = float(counts.max() / counts.sum()), int(len(counts))
    else:
        chance, n_classes = 0.0, 0
    return ProbeResult(task=task, label=label, kind=kind, score=score, control=control,
                       selectivity=score - control, chance=chance, n_items=len(target),
                       n_classes=n_classes, fold_scores=fold_scores)


def parameterized_probe(x: np.ndarray, y: Sequence[Any] | np.ndarray,
                        parameter: Sequence[Any] | np.ndarray, *, kind: Kind, task: str,
                        label: str, parameter_name: str, bins: int | None = None,
                        params: ProbeParams | None = None) -> ParameterizedProbe:
    """Probe performance against a task parameter: one probe (and control) per bin.

    Args:
        x: ``[N, D]`` representations.
        y: The probed label of each item.
        parameter: The task parameter of each item (e.g. the slope).
        kind: The probe's kind.
        task, label, parameter_name: For messages and the result.
        bins: None: every distinct parameter value is a bin (sorted); an integer: that many
            quantile bins of a numeric parameter (equal counts up to ties).
        params: The choices; defaults when None.

    Raises:
        UserError: A bin with fewer items than folds (named), or any error of :func:`probe`.
    """
    p = params or ProbeParams()
    values = np.asarray(parameter)
    if len(values) != len(y):
        raise UserError(f"task '{task}': {len(values)} values of '{parameter_name}' for "
                        f"{len(y)} items", key=parameter_name, fix="give one value per item")
    if bins is None:
        keys = np.unique(values)
        groups = [(str(k), np.flatnonzero(values == k)) for k in keys]
    else:
        numeric = values.astype(np.float64)
        edges = np.unique(np.quantile(numeric, np.linspace(0, 1, bins + 1)))
        which = np.clip(np.searchsorted(edges, numeric, side="right") - 1, 0, len(edges) - 2)
        groups = [(f"[{edges[b]:g}, {edges[b + 1]:g}]", np.flatnonzero(which == b))
                  for b in range(len(edges) - 1)]
        groups = [g for g in groups if len(g[1])]
    target = np.asarray(y)
    x = np.asarray(x)
    results = []
    for name, rows in groups:
        if len(rows) < p.folds:
            raise UserError(f"task '{task}': condition '{parameter_name}={name}' has "
                            f"{len(rows)} items, fewer than the probe's {p.folds} folds",
                            key="probes.folds", fix=f"use at most {len(rows)} folds, fewer "
                            "bins, or more items per condition")
        results.append(probe(x[rows], target[rows], kind=kind, task=task,
                             label=f"{label}|{parameter_name}={name}", params=p))
    return ParameterizedProbe(task=task, label=label, parameter=parameter_name,
                              bins=tuple(g[0] for g in groups), probes=tuple(results))


def probe_sites(sites: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[Any]], *,
                task: str, regression: Collection[str] = (),
                params: ProbeParams | None = None) -> dict[str, dict[str, ProbeResult]]:
    """Every label probed at every site (per layer profiles).

    Args:
        sites: Site name -> ``[N, D]`` representations of the same items.
        labels: Label name -> one value per item.
        task: For messages and the results.
        regression: The labels probed by ridge regression (the others by logistic regression).
        params: The choices; defaults when None.
    """
    return {site: {name: probe(x, values, task=task, label=name, params=params,
                               kind="regression" if name in regression else "classification")
                   for name, values in labels.items()}
            for site, x in sites.items()}
