"""Continual-learning metrics as pure functions of the accuracy matrix.

``A`` is lower-triangular and in percent: ``A[t][i]`` is the score on task ``i`` after training
task ``t`` (0-based here; the papers count from 1), defined for ``i <= t``. ``T = len(A)``.

Two families, each implemented exactly as its paper writes it so published tables reproduce:

* ModalPrompt (Appendix A): ``last``, ``avg``, ``B_t``/``B`` (forgetting, lower is better) and
  ``M_t``/``M`` (mean accuracy at stage t), with t = 2..T.
* ProgLoRA (section 5.3): ``acc`` (same as ``last``), ``maa``, ``bwt`` (divides by T; negative
  means forgetting) and ``fwt`` (needs the isolation row A0, one score per task).
* ``la``, learning accuracy (Riemer et al., 2019): the mean of the diagonal A[i][i], each task's
  score right after it was learned. It is plasticity alone, so it separates "never learned" from
  "forgot" (Last = LA - forgetting), and it is the fair criterion to tune each method's learning
  rate on (tuning a baseline on Last would reward whatever forgets least, not what learns).

Partial matrices: a matrix with fewer rows than the experiment has tasks gives the metrics "so
far", i.e. every formula evaluated with T = number of rows. Metrics that need T >= 2 (Avg, B, M,
BWT) are undefined for a single row; the per-metric functions raise ``ValueError`` and
``all_metrics`` omits them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean

Matrix = Sequence[Sequence[float]]


def validate_matrix(matrix: Matrix) -> list[list[float]]:
    """Return the lower triangle of ``matrix`` as floats, checking its shape.

    Row t (0-based) must have exactly t + 1 entries, or more entries that are all ``None``
    beyond position t (a square matrix with nulls above the diagonal, as JSON often stores it).
    Raises ``ValueError`` naming the row and column of the first problem.
    """
    if not isinstance(matrix, Sequence) or isinstance(matrix, str) or len(matrix) == 0:
        raise ValueError("accuracy matrix must be a non-empty list of rows")
    out: list[list[float]] = []
    for t, row in enumerate(matrix):
        if not isinstance(row, Sequence) or isinstance(row, str):
            raise ValueError(f"matrix row {t + 1} is not a list")
        if len(row) < t + 1:
            raise ValueError(f"matrix row {t + 1} has {len(row)} entries, needs {t + 1} (tasks 1..{t + 1})")
        extra = [j + 1 for j, v in enumerate(row) if j > t and v is not None]
        if extra:
            raise ValueError(
                f"matrix row {t + 1} has values above the diagonal (columns {extra}); "
                f"row t holds tasks 1..t only (use null for the rest)"
            )
        out.append([_score(v, t, i) for i, v in enumerate(row[: t + 1])])
    return out


def _score(value: object, t: int, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"matrix entry at row {t + 1}, column {i + 1} is not a finite number: {value!r}")
    return float(value)


def _need_rows(a: list[list[float]], n: int, name: str) -> None:
    if len(a) < n:
        raise ValueError(f"{name} needs at least {n} rows of the accuracy matrix, got {len(a)}")


# ---- ModalPrompt (Appendix A) ------------------------------------------------------------


def last_per_task(matrix: Matrix) -> list[float]:
    """Last_i = A[T][i] for i = 1..T."""
    a = validate_matrix(matrix)
    return list(a[-1])


def last(matrix: Matrix) -> float:
    """Last = mean over i of A[T][i]."""
    return fmean(last_per_task(matrix))


def avg_per_task(matrix: Matrix) -> list[float]:
    """Avg_i = mean over t = i+1..T of A[t][i], for i = 1..T-1 (needs T >= 2)."""
    a = validate_matrix(matrix)
    _need_rows(a, 2, "Avg")
    n = len(a)
    return [fmean(a[t][i] for t in range(i + 1, n)) for i in range(n - 1)]


def avg(matrix: Matrix) -> float:
    """Avg = mean of Avg_i over i = 1..T-1."""
    return fmean(avg_per_task(matrix))


def b_per_stage(matrix: Matrix) -> list[float]:
    """B_t = 1/(t-1) * sum_{i<t} (A[i][i] - A[t][i]) for t = 2..T (lower is better)."""
    a = validate_matrix(matrix)
    _need_rows(a, 2, "B")
    return [fmean(a[i][i] - a[t][i] for i in range(t)) for t in range(1, len(a))]


def b(matrix: Matrix) -> float:
    """B = mean of B_t over t = 2..T."""
    return fmean(b_per_stage(matrix))


def m_per_stage(matrix: Matrix) -> list[float]:
    """M_t = 1/t * sum_{i<=t} A[t][i] for t = 2..T."""
    a = validate_matrix(matrix)
    _need_rows(a, 2, "M")
    return [fmean(a[t]) for t in range(1, len(a))]


def m(matrix: Matrix) -> float:
    """M = mean of M_t over t = 2..T."""
    return fmean(m_per_stage(matrix))


# ---- ProgLoRA (section 5.3) --------------------------------------------------------------


def acc(matrix: Matrix) -> float:
    """ACC = 1/T * sum_i A[T][i] (identical to ModalPrompt's Last)."""
    return last(matrix)


def maa(matrix: Matrix) -> float:
    """MAA = 1/T * sum_{t=1..T} (1/t * sum_{k<=t} A[t][k])."""
    a = validate_matrix(matrix)
    return fmean(fmean(row) for row in a)


def bwt(matrix: Matrix) -> float:
    """BWT = 1/T * sum_{i=1..T} (A[T][i] - A[i][i]); divides by T as the paper does (needs T >= 2)."""
    a = validate_matrix(matrix)
    _need_rows(a, 2, "BWT")
    return fmean(a[-1][i] - a[i][i] for i in range(len(a)))


def fwt(matrix: Matrix, isolation: Sequence[float]) -> float:
    """FWT = 1/T * sum_i (A[i][i] - A0[i]); ``isolation`` is A0, one entry per task.

    ``isolation`` may be longer than the matrix (the full task list of a partial run); only its
    first T entries are used.
    """
    a = validate_matrix(matrix)
    if len(isolation) < len(a):
        raise ValueError(f"isolation row has {len(isolation)} entries, needs at least {len(a)}")
    a0 = [_score(v, 0, i) for i, v in enumerate(isolation[: len(a)])]
    return fmean(a[i][i] - a0[i] for i in range(len(a)))


def la(matrix: Matrix) -> float:
    """LA = mean over i of A[i][i] (learning accuracy, Riemer et al., 2019)."""
    a = validate_matrix(matrix)
    return fmean(a[i][i] for i in range(len(a)))


def all_metrics(matrix: Matrix, isolation: Sequence[float] | None = None) -> dict[str, object]:
    """Every metric defined for ``matrix`` (and ``isolation`` when given), as a JSON-ready dict.

    Keys: ``T`` (rows used), ``last``, ``acc``, ``maa``, ``la``, ``last_per_task`` (always);
    ``avg``, ``avg_per_task`` (tasks 1..T-1), ``B``, ``B_t`` and ``M``, ``M_t`` (stages 2..T),
    ``bwt`` (only when T >= 2); ``fwt`` (only with an isolation row).
    """
    a = validate_matrix(matrix)
    out: dict[str, object] = {
        "T": len(a),
        "last": last(a),
        "acc": acc(a),
        "maa": maa(a),
        "la": la(a),
        "last_per_task": last_per_task(a),
    }
    if len(a) >= 2:
        out.update(
            avg=avg(a),
            avg_per_task=avg_per_task(a),
            B=b(a),
            B_t=b_per_stage(a),
            M=m(a),
            M_t=m_per_stage(a),
            bwt=bwt(a),
        )
    if isolation is not None:
        out["fwt"] = fwt(a, isolation)
    return out
