"""Representational similarity analysis (RSA) of one site's embeddings against task hypotheses.

Steps (docs/method.md, "Similarity, probes, attention"): z-score every dimension over the items;
average the items of each condition (or keep the items, ``level="item"``); the cosine-similarity
matrix of those rows; the Spearman correlation of its upper triangle (diagonal excluded) with the
upper triangle of each hypothesis matrix; a one-sided permutation test that relabels the rows and
columns of the similarity matrix jointly. Hypotheses are similarities (larger: the two rows should
be represented more alike), so alignment is a positive correlation.

Also: the hypothesis matrices of a task from its item-pair hypotheses
(:func:`hypothesis_matrices`), the per-row alignment (:func:`row_alignment`) and the correlation
between the gain in accuracy and the change of alignment (:func:`alignment_gain_correlation`).
Pure numpy and scipy.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

from replandscape.errors import UserError

Level = Literal["condition", "item"]
LEVELS = ("condition", "item")
# a permuted correlation within this of the observed one counts as reaching it (float noise)
_TIE = 1e-12
# similarities are rounded to this many decimals before ranking
_DECIMALS = 12


@dataclass(frozen=True)
class RSAParams:
    """Choices of the RSA.

    Attributes:
        level: ``condition`` (one row per condition: the mean of its items) or ``item``.
        n_permutations: Permutations of the test (0: no test, p-values are NaN).
        seed: Seed of the permutations.
        zscore: Standardise each dimension over the items before anything else.
        batch: Most permutations evaluated at once (fewer when ``batch x rows^2`` floats would
            pass 32 MiB).
    """

    level: Level = "condition"
    n_permutations: int = 1000
    seed: int = 0
    zscore: bool = True
    batch: int = 64


@dataclass(frozen=True, eq=False)
class RSAResult:
    """The RSA of one site.

    Attributes:
        task: The task the hypotheses belong to.
        level: ``condition`` or ``item``.
        rows: The row names of the similarity matrix (sorted conditions, or item positions).
        n_items: Items per row.
        similarity: The ``rows x rows`` cosine-similarity matrix.
        correlation: Spearman correlation of the upper triangles, per hypothesis (NaN when the
            similarity triangle is constant).
        p_value: Permutation p-value per hypothesis, ``(1 + #{perm >= observed}) / (1 + n)``.
        row_correlation: Per hypothesis, each row's Spearman correlation of its similarities to
            the other rows with the hypothesis row (NaN where undefined).
        n_permutations: Permutations of the test.
        null_mean: Mean permuted correlation per hypothesis.
    """

    task: str
    level: str
    rows: tuple[str, ...]
    n_items: tuple[int, ...]
    similarity: np.ndarray
    correlation: dict[str, float]
    p_value: dict[str, float]
    row_correlation: dict[str, tuple[float, ...]] = field(default_factory=dict)
    n_permutations: int = 0
    null_mean: dict[str, float] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN as None)."""
        return {
            "task": self.task, "level": self.level, "rows": list(self.rows),
            "n_items": [int(n) for n in self.n_items],
            "similarity": [[_num(v) for v in row] for row in np.asarray(self.similarity)],
            "correlation": {k: _num(v) for k, v in self.correlation.items()},
            "p_value": {k: _num(v) for k, v in self.p_value.items()},
            "row_correlation": {k: [_num(v) for v in vs]
                                for k, vs in self.row_correlation.items()},
            "n_permutations": int(self.n_permutations),
            "null_mean": {k: _num(v) for k, v in self.null_mean.items()},
        }


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def zscore(x: np.ndarray) -> np.ndarray:
    """Each column minus its mean over the rows, over its standard deviation; a constant column
    becomes 0 (it carries nothing, and dividing by 0 would make it NaN)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    std = centred.std(axis=0)
    return centred / np.where(std > 0, std, 1.0)


def condition_means(x: np.ndarray, conditions: Sequence[str]
                    ) -> tuple[tuple[str, ...], np.ndarray, tuple[int, ...]]:
    """The sorted condition names, the mean row of each, and the items of each."""
    keys = np.asarray([str(c) for c in conditions])
    names, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    # one-hot product rather than numpy.add.at, which is slow on wide rows
    onehot = np.zeros((len(names), len(keys)))
    onehot[inverse, np.arange(len(keys))] = 1.0
    sums = onehot @ np.asarray(x, dtype=np.float64)
    return tuple(str(n) for n in names), sums / counts[:, None], tuple(int(c) for c in counts)


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows; a zero row has similarity 0 to everything."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def upper_triangle(m: np.ndarray) -> np.ndarray:
    """The entries above the diagonal, row by row (``numpy.triu_indices(n, k=1)``)."""
    m = np.asarray(m)
    return m[np.triu_indices(m.shape[0], k=1)]


def spearman_upper(similarity: np.ndarray, hypothesis: np.ndarray) -> float:
    """Spearman correlation of the two upper triangles (NaN when either is constant)."""
    a, b = upper_triangle(similarity), upper_triangle(hypothesis)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _ranked(m: np.ndarray) -> np.ndarray:
    """A symmetric matrix of the average ranks of the upper triangle, centred and scaled to unit
    norm over the triangle (diagonal 0), so that a dot product of two is a Pearson correlation
    of ranks, i.e. a Spearman correlation."""
    n = m.shape[0]
    iu = np.triu_indices(n, k=1)
    ranks = stats.rankdata(m[iu])
    ranks -= ranks.mean()
    norm = np.linalg.norm(ranks)
    out = np.zeros((n, n))
    out[iu] = ranks / norm if norm > 0 else 0.0
    return out + out.T


def permutation_test(similarity: np.ndarray, hypothesis: np.ndarray, n_permutations: int,
                     seed: int = 0, batch: int = 64) -> tuple[float, float, float]:
    """Observed Spearman correlation, one-sided permutation p-value and the null's mean.

    Each permutation relabels the rows and columns of the similarity matrix jointly. A joint
    permutation moves the triangle's entries without changing their values, so the triangle is
    ranked once and each permuted correlation is a dot product of ranks.
    """
    s, h = _ranked(np.asarray(similarity, dtype=np.float64)), _ranked(
        np.asarray(hypothesis, dtype=np.float64))
    if not s.any() or not h.any():
        return float("nan"), float("nan"), float("nan")
    observed = float(np.sum(s * h) / 2)  # each pair counted twice in the full matrices
    if n_permutations <= 0:
        return observed, float("nan"), float("nan")
    n = s.shape[0]
    rng = np.random.default_rng(seed)
    reached = 0
    total = 0.0
    done = 0
    # a batch gathers b x n x n floats: keep it near 32 MiB on item-level matrices
    batch = max(1, min(batch, (1 << 22) // (n * n)))
    while done < n_permutations:
        b = min(batch, n_permutations - done)
        perms = np.argsort(rng.random((b, n)), axis=1)
        permuted = s[perms[:, :, None], perms[:, None, :]]
        values = np.einsum("bij,ij->b", permuted, h) / 2
        reached += int(np.sum(values >= observed - _TIE))
        total += float(values.sum())
        done += b
    return observed, (1 + reached) / (1 + n_permutations), total / n_permutations


def row_alignment(similarity: np.ndarray, hypothesis: np.ndarray) -> tuple[float, ...]:
    """Per row: Spearman correlation of its similarities to the other rows with the hypothesis
    row (NaN when a row is constant or has fewer than 3 others)."""
    n = similarity.shape[0]
    out = []
    for i in range(n):
        others = np.arange(n) != i
        a, b = similarity[i, others], hypothesis[i, others]
        if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            out.append(float("nan"))
        else:
            out.append(float(stats.spearmanr(a, b).statistic))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# hypotheses
# --------------------------------------------------------------------------------------------

PairHypothesis = Callable[[Mapping[str, Any], Mapping[str, Any]], float]


def hypothesis_matrices(pairs: Mapping[str, PairHypothesis], labels: Sequence[Mapping[str, Any]],
                        *, level: str = "condition", task: str = "?",
                        condition_key: str = "condition"
                        ) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """Hypothesis matrices from item-pair hypotheses.

    At the item level entry ``(i, j)`` is ``pair(labels[i], labels[j])``. At the condition level
    (rows: the sorted values of ``labels[..][condition_key]``) entry ``(c, d)`` is the mean of
    ``pair`` over the item pairs ``i in c, j in d, i != j``: exactly the shared value when the
    hypothesis is a property of the condition (same slope), and the share of agreeing pairs when
    it is a property of the item (same answer). Symmetric by construction when ``pair`` is.
    """
    if level not in LEVELS:
        raise UserError(f"unknown RSA level '{level}' for task '{task}'", key="rsa.level",
                        fix=f"use one of {', '.join(LEVELS)}")
    n = len(labels)
    if level == "item":
        rows = tuple(str(i) for i in range(n))
        out = {name: np.array([[pair(labels[i], labels[j]) for j in range(n)]
                               for i in range(n)], dtype=np.float64)
               for name, pair in pairs.items()}
        return rows, out
    try:
        keys = [str(lab[condition_key]) for lab in labels]
    except KeyError:
        raise UserError(f"task '{task}': an item has no '{condition_key}' label",
                        key=condition_key, fix="analyse items made by the task's generator"
                        ) from None
    rows = tuple(sorted(set(keys)))
    members = {c: [i for i, k in enumerate(keys) if k == c] for c in rows}
    out = {}
    for name, pair in pairs.items():
        m = np.zeros((len(rows), len(rows)))
        for a, c in enumerate(rows):
            for b in range(a, len(rows)):
                d = rows[b]
                values = [pair(labels[i], labels[j]) for i in members[c] for j in members[d]
                          if i != j]
                m[a, b] = m[b, a] = float(np.mean(values)) if values else float("nan")
        out[name] = m
    return rows, out


def task_hypotheses(task: str) -> Mapping[str, PairHypothesis]:
    """The item-pair hypotheses a generated task declares (its module's ``HYPOTHESES``)."""
    try:
        module = importlib.import_module(f"replandscape.tasks.generators.{task}")
    except ModuleNotFoundError:
        module = None
    found = getattr(module, "HYPOTHESES", None)
    if not found:
        raise UserError(f"task '{task}' declares no hypotheses for the RSA", key="task",
                        fix="use a task with designed conditions (regression, reading)")
    return dict(found)


# --------------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------------


def _check_hypothesis(task: str, name: str, m: np.ndarray, rows: Sequence[str]) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    n = len(rows)
    key = f"{task}.hypotheses.{name}"
    if m.shape != (n, n):
        raise UserError(f"task '{task}': hypothesis '{name}' is {'x'.join(map(str, m.shape))} "
                        f"but there are {n} rows ({', '.join(rows[:4])}{', ...' if n > 4 else ''})",
                        key=key, fix=f"give a {n}x{n} matrix over the sorted rows")
    if not np.all(np.isfinite(m)):
        i, j = (int(v) for v in np.argwhere(~np.isfinite(m))[0])
        raise UserError(f"task '{task}': hypothesis '{name}' is undefined between '{rows[i]}' "
                        f"and '{rows[j]}'", key=key, fix="give every entry a number")
    if not np.allclose(m, m.T, rtol=0, atol=1e-12):
        i, j = (int(v) for v in np.argwhere(~np.isclose(m, m.T, rtol=0, atol=1e-12))[0])
        raise UserError(f"task '{task}': hypothesis '{name}' is not symmetric: entry "
                        f"('{rows[i]}', '{rows[j]}') is {m[i, j]:g} and its mirror {m[j, i]:g}",
                        key=key, fix="make the matrix symmetric")
    if np.ptp(upper_triangle(m)) == 0:
        raise UserError(f"task '{task}': hypothesis '{name}' is the same for every pair of rows "
                        f"({', '.join(rows[:4])}{', ...' if n > 4 else ''}), so it predicts "
                        "nothing", key=key, fix="analyse conditions the hypothesis separates")
    return m


def rsa(embeddings: np.ndarray, conditions: Sequence[str], hypotheses: Mapping[str, np.ndarray],
        *, task: str, params: RSAParams | None = None) -> RSAResult:
    """RSA of one site.

    Args:
        embeddings: ``[N, D]`` item representations.
        conditions: The condition label of each item.
        hypotheses: Hypothesis name -> symmetric matrix over the rows (the sorted conditions at
            the condition level, the items in order at the item level), as
            :func:`hypothesis_matrices` makes them.
        task: The task's name (for messages and the result).
        params: The choices; defaults when None.

    Raises:
        UserError: Fewer than 3 rows, a condition list of the wrong length, a hypothesis of the
            wrong size, not symmetric, undefined somewhere or constant.
    """
    p = params or RSAParams()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(conditions):
        raise UserError(f"task '{task}': {len(conditions)} condition labels for embeddings of "
                        f"shape {x.shape}", key="condition", fix="give one label per item")
    if p.level not in LEVELS:
        raise UserError(f"unknown RSA level '{p.level}' for task '{task}'", key="rsa.level",
                        fix=f"use one of {', '.join(LEVELS)}")
    if p.zscore:
        x = zscore(x)
    if p.level == "condition":
        rows, x, counts = condition_means(x, conditions)
    else:
        rows, counts = tuple(str(i) for i in range(len(x))), (1,) * len(x)
    if len(rows) < 3:
        raise UserError(f"task '{task}': RSA needs at least 3 {p.level}s, got {len(rows)} "
                        f"({', '.join(rows)})", key="condition",
                        fix="analyse items of at least 3 conditions")
    checked = {name: _check_hypothesis(task, name, m, rows) for name, m in hypotheses.items()}
    # rounded so that float noise does not split ties: two conditions represented identically
    # must tie with every other such pair in the ranks
    sim = np.round(cosine_similarity(x), _DECIMALS)
    correlation, p_value, null_mean, per_row = {}, {}, {}, {}
    for i, (name, m) in enumerate(checked.items()):
        obs, pv, mean = permutation_test(sim, m, p.n_permutations, seed=p.seed + i,
                                         batch=p.batch)
        correlation[name], p_value[name], null_mean[name] = obs, pv, mean
        per_row[name] = row_alignment(sim, m) if p.level == "condition" else ()
    return RSAResult(task=task, level=p.level, rows=rows, n_items=counts, similarity=sim,
                     correlation=correlation, p_value=p_value, row_correlation=per_row,
                     n_permutations=p.n_permutations, null_mean=null_mean)


# --------------------------------------------------------------------------------------------
# behaviour against representation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GainCorrelation:
    """Per layer: the correlation between the accuracy gain and the change of alignment.

    Attributes:
        n: Conditions (or items) correlated.
        pearson, pearson_p: Pearson r per layer and its two-sided p-value.
        spearman, spearman_p: Spearman rho per layer and its two-sided p-value.
    """

    n: int
    pearson: tuple[float, ...]
    pearson_p: tuple[float, ...]
    spearman: tuple[float, ...]
    spearman_p: tuple[float, ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {"n": self.n, "pearson": [_num(v) for v in self.pearson],
                "pearson_p": [_num(v) for v in self.pearson_p],
                "spearman": [_num(v) for v in self.spearman],
                "spearman_p": [_num(v) for v in self.spearman_p]}


def alignment_gain_correlation(gain: Sequence[float] | np.ndarray,
                               delta_alignment: Sequence[Sequence[float]] | np.ndarray, *,
                               task: str = "?") -> GainCorrelation:
    """Correlate the gain in accuracy from ICL with the change of a representation measure.

    Args:
        gain: ``[n]`` accuracy gain per condition or item (k-shot minus 0-shot).
        delta_alignment: ``[layers, n]`` (or ``[n]`` for one layer) change of the measure per
            layer (hypothesis alignment, attention ratio), in the same order as ``gain``.
        task: For messages.

    Returns:
        Pearson and Spearman correlations per layer with their p-values; NaN for a layer where
        either vector is constant or has a missing value.

    Raises:
        UserError: Lengths differ or fewer than 3 conditions.
    """
    g = np.asarray(gain, dtype=np.float64)
    d = np.asarray(delta_alignment, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if g.ndim != 1 or d.ndim != 2 or d.shape[1] != g.shape[0]:
        raise UserError(f"task '{task}': {g.shape[0] if g.ndim == 1 else g.shape} gains but "
                        f"alignment changes of shape {d.shape}", key="condition",
                        fix="give one gain and one change per condition, in the same order")
    if g.shape[0] < 3:
        raise UserError(f"task '{task}': the gain correlation needs at least 3 conditions, got "
                        f"{g.shape[0]}", key="condition", fix="analyse more conditions")
    pr: list[float] = []
    pp: list[float] = []
    sr: list[float] = []
    sp: list[float] = []
    for row in d:
        if (not np.all(np.isfinite(row)) or not np.all(np.isfinite(g)) or np.ptp(row) == 0
                or np.ptp(g) == 0):
            for lst in (pr, pp, sr, sp):
                lst.append(float("nan"))
            continue
        pearson = stats.pearsonr(g, row)
        spearman = stats.spearmanr(g, row)
        pr.append(float(pearson.statistic))
        pp.append(float(pearson.pvalue))
        sr.append(float(spearman.statistic))
        sp.append(float(spearman.pvalue))
    return GainCorrelation(n=int(g.shape[0]), pearson=tuple(pr), pearson_p=tuple(pp),
                           spearman=tuple(sr), spearman_p=tuple(sp))
