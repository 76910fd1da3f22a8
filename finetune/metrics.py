"""Classification metrics, all from counts that add up exactly across processes: the
confusion matrix, top-5 hits and calibration bins.

- top-1 accuracy, top-5 accuracy (more than 5 classes), balanced accuracy (the mean of the
  recalls of the classes present), macro F1 (the mean F1 over the classes present or
  predicted; precision 0 for a class never predicted: scikit-learn's definitions with
  ``zero_division=0``);
- expected calibration error: the confidence (top softmax probability) cut into
  ``CALIBRATION_BINS`` equal-width bins; ECE = sum over bins of |accuracy - confidence| weighted
  by the bin's share of the samples (Guo et al., 2017).
"""

from __future__ import annotations

import torch

CALIBRATION_BINS = 15


def calibration_counts(confidence: torch.Tensor, hit: torch.Tensor, weight: torch.Tensor,
                       bins: int = CALIBRATION_BINS) -> torch.Tensor:
    """``(3, bins)``: per confidence bin the number of samples, their summed confidence and
    their summed hits (``weight`` 0 leaves a sample out). On the device, no host sync."""
    index = (confidence.float() * bins).long().clamp_(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    w = weight.double()
    out[0].index_add_(0, index, w)
    out[1].index_add_(0, index, confidence.double() * w)
    out[2].index_add_(0, index, hit.double() * w)
    return out


def expected_calibration_error(counts: list[list[float]] | torch.Tensor) -> float:
    """ECE from :func:`calibration_counts`."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    n = c[0].sum()
    if n == 0:
        return 0.0
    return float(((c[2] - c[1]).abs()).sum() / n)  # sum_b n_b/n * |acc_b - conf_b|


def per_class(confusion: list[list[int]], class_names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class from ``confusion[true][predicted]``.

    A class never predicted has precision 0 (no true positives to credit), as scikit-learn's
    ``zero_division=0``; F1 is 0 where precision + recall is 0.
    """
    m = torch.tensor(confusion, dtype=torch.float64)
    tp, predicted, actual = m.diag(), m.sum(dim=0), m.sum(dim=1)
    rows = []
    for i, name in enumerate(class_names):
        p = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        r = float(tp[i] / actual[i]) if actual[i] else 0.0
        rows.append({"class": name, "precision": p, "recall": r,
                     "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(actual[i])})
    return rows


def summary(confusion: list[list[int]], top5_hits: int | None = None,
            calibration: list[list[float]] | None = None) -> dict:
    """``acc``, ``balanced_acc``, ``macro_f1`` and, when given, ``top5_acc`` and ``ece``
    (keys without a split prefix)."""
    m = torch.tensor(confusion, dtype=torch.float64)
    n = float(m.sum())
    rows = per_class(confusion, [str(i) for i in range(len(confusion))])
    present = [r for r in rows if r["support"]]
    seen = [r for r, predicted in zip(rows, m.sum(dim=0).tolist(), strict=True)
            if r["support"] or predicted]
    out = {"acc": float(m.trace()) / n if n else 0.0,
           "balanced_acc": sum(r["recall"] for r in present) / len(present) if present else 0.0,
           "macro_f1": sum(r["f1"] for r in seen) / len(seen) if seen else 0.0}
    if top5_hits is not None and len(confusion) > 5:
        out["top5_acc"] = top5_hits / n if n else 0.0
    if calibration is not None:
        out["ece"] = expected_calibration_error(calibration)
    return out
