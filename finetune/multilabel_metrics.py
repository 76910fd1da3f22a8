"""Multi-label classification metrics on ``(N, C)`` scores and ``{0, 1}`` targets, computed on
the CPU in float64 and equal to scikit-learn's:

- average precision per class, ``average_precision_score(targets[:, c], scores[:, c])``
  (tied scores form one threshold); NaN for a class with no positive, left out of the mean;
- F1, precision and recall (micro, macro, per class) and the exact-match ratio at given
  thresholds, as ``f1_score`` / ``precision_score`` / ``recall_score`` with
  ``zero_division=0`` and ``accuracy_score``;
- per-class thresholds that maximise each class's F1 on validation scores.
"""

from __future__ import annotations

import torch


def _as_cpu_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float64 tensor on the CPU."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _checked(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as CPU float64, after checking they are ``(N, C)`` alike and targets are 0/1."""
    s, t = _as_cpu_float64(scores), _as_cpu_float64(targets)
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must both be (N, C); got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    if not ((t == 0) | (t == 1)).all():
        raise ValueError("targets must hold only 0 and 1 (one column per label)")
    return s, t


def _sorted_descending(s: torch.Tensor, t: torch.Tensor):
    """Per column: scores sorted high to low, the targets in that order, and a mask that is
    True at the last row of each run of equal scores (one row per distinct threshold)."""
    sorted_s, order = torch.sort(s, dim=0, descending=True, stable=True)
    sorted_t = torch.gather(t, 0, order)
    last_of_run = torch.ones_like(sorted_s, dtype=torch.bool)
    last_of_run[:-1] = sorted_s[:-1] != sorted_s[1:]
    return sorted_s, sorted_t, last_of_run


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision ``(C,)`` in float64, as scikit-learn's
    ``average_precision_score`` column by column: AP = sum over distinct score thresholds of
    (R_k - R_{k-1}) * P_k, tied scores counting as one threshold. NaN where a class has no
    positive."""
    s, t = _checked(scores, targets)
    n = s.shape[0]
    _, sorted_t, last_of_run = _sorted_descending(s, t)
    tp = sorted_t.cumsum(0)
    precision = tp / torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    # Each positive adds 1/npos to recall at the threshold of its run of tied scores: the
    # run's last row. Find that row for every row (reverse running minimum of run ends).
    rows = torch.arange(n).unsqueeze(1).expand_as(s)
    run_end = torch.where(last_of_run, rows, torch.full_like(rows, n))
    run_end = run_end.flip(0).cummin(0).values.flip(0)
    precision_at_threshold = torch.gather(precision, 0, run_end)
    return (sorted_t * precision_at_threshold).sum(0) / t.sum(0)  # 0/0: NaN, no positive


def mean_average_precision(ap: torch.Tensor) -> float:
    """The mean of the per-class APs that are not NaN; 0.0 when all are NaN."""
    ap = _as_cpu_float64(ap)
    present = ap[~ap.isnan()]
    return float(present.mean()) if present.numel() else 0.0


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (scikit-learn's ``zero_division=0``)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def f1_at(probs: torch.Tensor, targets: torch.Tensor,
          thresholds: torch.Tensor | float) -> dict:
    """F1, precision and recall with a label predicted where ``probs >= thresholds`` (one
    threshold, or one per class), as scikit-learn with ``zero_division=0``.

    ``f1_macro`` averages over ALL ``C`` classes, as scikit-learn's ``average="macro"``: a
    class with no support and no prediction counts as F1 0. ``subset_acc`` is the share of
    samples whose whole label set is right (``accuracy_score`` on multi-label input).
    """
    p, t = _checked(probs, targets)
    predicted = (p >= _as_cpu_float64(thresholds)).double()
    tp = (predicted * t).sum(0)
    fp = (predicted * (1 - t)).sum(0)
    fn = ((1 - predicted) * t).sum(0)
    per_class_f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()
    subset = (predicted == t).all(dim=1).double()
    return {
        "f1_micro": float(_ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all)),
        "f1_macro": float(per_class_f1.mean()),
        "precision_micro": float(_ratio(tp_all, tp_all + fp_all)),
        "recall_micro": float(_ratio(tp_all, tp_all + fn_all)),
        "per_class_f1": per_class_f1.tolist(),
        "per_class_precision": _ratio(tp, tp + fp).tolist(),
        "per_class_recall": _ratio(tp, tp + fn).tolist(),
        "support": [int(v) for v in (tp + fn).tolist()],
        "subset_acc": float(subset.mean()) if subset.numel() else 0.0,
    }


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor,
                    default: float = 0.5) -> torch.Tensor:
    """Per class ``(C,)`` float64, the threshold that maximises that class's F1 on these
    (validation) scores, for use as ``probs >= threshold``.

    The cuts tried lie between distinct scores; the top-scoring F1 wins, ties going to the
    highest threshold. The threshold is the midpoint between the lowest score predicted
    positive and the next lower distinct score; where every score is predicted positive it is
    the lowest score itself. A class with no positive keeps ``default``.
    """
    s, t = _checked(probs, targets)
    n = s.shape[0]
    positives = t.sum(0)
    if n == 0:
        return torch.full_like(positives, default)
    sorted_s, sorted_t, last_of_run = _sorted_descending(s, t)
    # Predicting the top k positive: F1 = 2 TP_k / (k + positives); only run ends are cuts.
    k = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    f1 = 2 * sorted_t.cumsum(0) / (k + positives)
    f1 = torch.where(last_of_run, f1, torch.full_like(f1, -1.0))
    best = f1.argmax(0, keepdim=True)  # the first maximum: the highest threshold among ties
    lowest_in = torch.gather(sorted_s, 0, best)
    # With every score in, the clamped row makes highest_out the lowest score: no midpoint.
    highest_out = torch.gather(sorted_s, 0, (best + 1).clamp(max=n - 1))
    midpoint = (lowest_in + highest_out) / 2
    # The lowest score in stays where there is no midpoint, or where the midpoint of two
    # neighbouring floats rounds onto the score below (which would then count as positive).
    threshold = torch.where(midpoint > highest_out, midpoint, lowest_in)
    return torch.where(positives > 0, threshold.squeeze(0), torch.full_like(positives, default))


def multilabel_summary(probs: torch.Tensor, targets: torch.Tensor,
                       thresholds: torch.Tensor | float) -> dict:
    """mAP, micro/macro F1, micro precision/recall and exact-match ratio at ``thresholds``,
    and per class its AP (NaN without positives), F1, precision, recall and support."""
    ap = average_precision(probs, targets)
    f = f1_at(probs, targets, thresholds)
    per_class = [
        {"ap": a, "f1": f1, "precision": p, "recall": r, "support": n}
        for a, f1, p, r, n in zip(ap.tolist(), f["per_class_f1"], f["per_class_precision"],
                                  f["per_class_recall"], f["support"], strict=True)
    ]
    return {
        "map": mean_average_precision(ap),
        **{key: f[key] for key in ("f1_micro", "f1_macro", "subset_acc",
                                   "precision_micro", "recall_micro")},
        "per_class": per_class,
    }


def pr_curves(scores: torch.Tensor, targets: torch.Tensor, points: int = 200
              ) -> list[dict | None]:
    """Per class its precision-recall curve, ``{"precision": [...], "recall": [...]}`` at
    each distinct score (recall rising; evenly thinned to about ``points``), starting from
    recall 0 at precision 1 as scikit-learn's ``precision_recall_curve`` ends; None for a
    class without positives."""
    s, t = _checked(scores, targets)
    n = s.shape[0]
    _, sorted_t, last_of_run = _sorted_descending(s, t)
    tp = sorted_t.cumsum(0)
    precision = tp / torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    curves = []
    for c in range(s.shape[1]):
        positives = float(t[:, c].sum())
        if positives == 0:
            curves.append(None)
            continue
        ends = torch.nonzero(last_of_run[:, c]).flatten()
        keep = ends[torch.linspace(0, len(ends) - 1, min(points, len(ends))).round().long()]
        curves.append({"precision": [1.0] + [round(v, 6) for v in precision[keep, c].tolist()],
                       "recall": [0.0] + [round(v / positives, 6) for v in tp[keep, c].tolist()]})
    return curves
