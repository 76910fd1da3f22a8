"""Multi-label metrics against scikit-learn on fixed arrays (tied scores, a class with no
positive, classes never predicted) and on seeded random scores rounded so that they tie."""

import numpy as np
import pytest
import torch

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from finetune.multilabel_metrics import (  # noqa: E402
    average_precision,
    f1_at,
    mean_average_precision,
    multilabel_summary,
    pr_curves,
    tune_thresholds,
)

# Columns: 0 ties at 0.8 and 0.3; 1 no positive but predicted at 0.5; 2 positives, ties,
# never predicted at 0.5; 3 no positive and never predicted at 0.5.
FIXED_SCORES = np.array([
    [0.9, 0.7, 0.10, 0.1],
    [0.8, 0.2, 0.40, 0.2],
    [0.8, 0.6, 0.20, 0.1],
    [0.8, 0.1, 0.40, 0.3],
    [0.3, 0.4, 0.30, 0.2],
    [0.3, 0.9, 0.05, 0.1],
    [0.1, 0.3, 0.45, 0.4],
    [0.6, 0.5, 0.20, 0.2],
])
FIXED_TARGETS = np.array([
    [1, 0, 0, 0],
    [0, 0, 1, 0],
    [1, 0, 0, 0],
    [1, 0, 1, 0],
    [0, 0, 1, 0],
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
])


def random_case(n: int = 200, c: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal (many ties) and targets that follow them loosely."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c)).round(1)
    targets = (rng.random((n, c)) < 0.8 * scores + 0.05).astype(np.int64)
    assert targets.sum(0).min() > 0
    return scores, targets


CASES = {"fixed": (FIXED_SCORES, FIXED_TARGETS), "random": random_case()}


def sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> list[float]:
    """scikit-learn's AP per column, NaN where the column has no positive."""
    return [sklearn_metrics.average_precision_score(targets[:, c], scores[:, c])
            if targets[:, c].any() else float("nan") for c in range(scores.shape[1])]


def test_average_precision_groups_tied_scores():
    # Thresholds 0.9, 0.8 (3 tied), 0.6, 0.3 (2 tied), 0.1 over positives at 0.9, 0.8, 0.8,
    # 0.3: AP = 1/4 * 1 + 2/4 * 3/4 + 1/4 * 4/7 = 0.2500 + 0.3750 + 0.1429.
    ap = average_precision(torch.tensor(FIXED_SCORES), torch.tensor(FIXED_TARGETS))
    assert ap.dtype == torch.float64 and ap.shape == (4,)
    assert ap[0].item() == pytest.approx(1 / 4 + 3 / 8 + 1 / 7)
    assert ap[2].item() == pytest.approx(sklearn_ap(FIXED_SCORES, FIXED_TARGETS)[2])
    assert ap[1].isnan() and ap[3].isnan()


@pytest.mark.parametrize("case", CASES)
def test_average_precision_matches_sklearn(case):
    scores, targets = CASES[case]
    ours = average_precision(torch.tensor(scores, dtype=torch.float32),
                             torch.tensor(targets).bool())
    expected = sklearn_ap(scores.astype(np.float32), targets)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("case", CASES)
def test_mean_average_precision_over_classes_with_positives(case):
    scores, targets = CASES[case]
    has_positive = targets.any(0)
    expected = sklearn_metrics.average_precision_score(
        targets[:, has_positive], scores[:, has_positive], average="macro")
    ours = mean_average_precision(average_precision(torch.tensor(scores),
                                                    torch.tensor(targets)))
    assert isinstance(ours, float)
    assert ours == pytest.approx(expected, rel=1e-12)


def test_mean_average_precision_all_nan_is_zero():
    assert mean_average_precision(torch.full((3,), float("nan"))) == 0.0
    assert mean_average_precision(torch.tensor([0.5, float("nan"), 1.0])) == 0.75


def sklearn_f1_report(targets: np.ndarray, predicted: np.ndarray) -> dict:
    """What :func:`f1_at` should return, from scikit-learn."""
    m = sklearn_metrics
    return {
        "f1_micro": m.f1_score(targets, predicted, average="micro", zero_division=0),
        "f1_macro": m.f1_score(targets, predicted, average="macro", zero_division=0),
        "precision_micro": m.precision_score(targets, predicted, average="micro",
                                             zero_division=0),
        "recall_micro": m.recall_score(targets, predicted, average="micro", zero_division=0),
        "per_class_f1": m.f1_score(targets, predicted, average=None, zero_division=0),
        "per_class_precision": m.precision_score(targets, predicted, average=None,
                                                 zero_division=0),
        "per_class_recall": m.recall_score(targets, predicted, average=None, zero_division=0),
        "support": targets.sum(0),
        "subset_acc": m.accuracy_score(targets, predicted),
    }


def assert_report_equal(ours: dict, expected: dict) -> None:
    assert set(ours) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-12, atol=1e-15, err_msg=key)
    assert all(isinstance(v, int) for v in ours["support"])


@pytest.mark.parametrize("case", CASES)
def test_f1_at_matches_sklearn(case):
    scores, targets = CASES[case]
    ours = f1_at(torch.tensor(scores), torch.tensor(targets), 0.5)
    assert_report_equal(ours, sklearn_f1_report(targets, (scores >= 0.5).astype(int)))


@pytest.mark.parametrize("case", CASES)
def test_f1_at_per_class_thresholds(case):
    scores, targets = CASES[case]
    thresholds = np.linspace(0.2, 0.8, scores.shape[1])
    ours = f1_at(torch.tensor(scores), torch.tensor(targets), torch.tensor(thresholds))
    assert_report_equal(ours, sklearn_f1_report(targets, (scores >= thresholds).astype(int)))


def test_f1_macro_averages_over_all_classes():
    # Class 0: TP 3, FP 2, FN 1 -> F1 2/3; the others 0, class 3 with neither support nor
    # prediction included, as scikit-learn does: (2/3) / 4.
    ours = f1_at(torch.tensor(FIXED_SCORES), torch.tensor(FIXED_TARGETS), 0.5)
    assert ours["f1_macro"] == pytest.approx(1 / 6)
    assert ours["per_class_f1"] == pytest.approx([2 / 3, 0.0, 0.0, 0.0])
    assert ours["support"] == [4, 0, 3, 0]
    assert ours["subset_acc"] == pytest.approx(1 / 8)


def column_f1(targets: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    return sklearn_metrics.f1_score(targets, scores >= threshold, zero_division=0)


def test_tune_thresholds_reaches_the_brute_force_best_f1():
    scores, targets = random_case(seed=1)
    targets[:, 6] = 0
    tuned = tune_thresholds(torch.tensor(scores), torch.tensor(targets), default=0.3)
    assert tuned.dtype == torch.float64 and tuned.shape == (7,)
    for c in range(6):
        best = max(column_f1(targets[:, c], scores[:, c], t) for t in np.unique(scores[:, c]))
        at_tuned = column_f1(targets[:, c], scores[:, c], tuned[c].item())
        assert at_tuned == pytest.approx(best, rel=1e-12), c
        assert at_tuned >= column_f1(targets[:, c], scores[:, c], 0.5)
    assert tuned[6].item() == 0.3


def test_tune_thresholds_rule():
    scores = torch.tensor([[0.9, 0.9, 0.9], [0.8, 0.8, 0.8], [0.3, 0.7, 0.3], [0.1, 0.6, 0.1]])
    targets = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 1]])
    tuned = tune_thresholds(scores.double(), targets)
    # Column 0: best cut below 0.8, midpoint to the next lower score 0.3.
    # Column 1: F1 2/3 both for {0.9} and for all four: the higher threshold wins.
    # Column 2: every score positive: the lowest score itself.
    assert tuned.tolist() == pytest.approx([0.55, 0.85, 0.1])


def test_tune_thresholds_between_neighbouring_floats():
    # 0.5 and the next float above: their midpoint rounds to 0.5, which must stay negative.
    above = float(np.nextafter(0.5, 1.0))
    scores, targets = torch.tensor([[above], [0.5]], dtype=torch.float64), torch.tensor([[1], [0]])
    tuned = tune_thresholds(scores, targets)
    assert tuned.item() == above
    assert f1_at(scores, targets, tuned)["f1_micro"] == 1.0


def test_tune_thresholds_no_positive_keeps_default():
    scores = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.1, 0.6]])
    targets = torch.tensor([[0, 0], [0, 1], [0, 1]])
    tuned = tune_thresholds(scores, targets, default=0.25)
    assert tuned.tolist() == pytest.approx([0.25, 0.4])


@pytest.mark.parametrize("case", CASES)
def test_multilabel_summary(case):
    scores, targets = CASES[case]
    thresholds = torch.full((scores.shape[1],), 0.5)
    out = multilabel_summary(torch.tensor(scores), torch.tensor(targets), thresholds)
    expected = sklearn_f1_report(targets, (scores >= 0.5).astype(int))
    ap = sklearn_ap(scores, targets)
    assert out["map"] == pytest.approx(np.nanmean(ap), rel=1e-12)
    for key in ("f1_micro", "f1_macro", "subset_acc", "precision_micro", "recall_micro"):
        assert out[key] == pytest.approx(expected[key], rel=1e-12), key
    assert len(out["per_class"]) == scores.shape[1]
    for c, row in enumerate(out["per_class"]):
        np.testing.assert_allclose(row["ap"], ap[c], rtol=1e-12, equal_nan=True)
        assert row["f1"] == pytest.approx(expected["per_class_f1"][c], abs=1e-12)
        assert row["precision"] == pytest.approx(expected["per_class_precision"][c], abs=1e-12)
        assert row["recall"] == pytest.approx(expected["per_class_recall"][c], abs=1e-12)
        assert row["support"] == expected["support"][c]


def test_no_samples():
    scores, targets = torch.zeros(0, 3), torch.zeros(0, 3)
    assert average_precision(scores, targets).isnan().all()
    assert tune_thresholds(scores, targets, default=0.4).tolist() == pytest.approx([0.4] * 3)
    out = f1_at(scores, targets, 0.5)
    assert out["subset_acc"] == 0.0 and out["f1_macro"] == 0.0 and out["support"] == [0] * 3


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"must both be \(N, C\)"):
        average_precision(torch.rand(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        f1_at(torch.rand(4, 3), torch.full((4, 3), 2), 0.5)


def test_pr_curves_match_sklearn_precision_recall_curve():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((120, 4)), 1)  # ties
    targets = (rng.random((120, 4)) < 0.35).astype(np.int64)
    targets[:, 3] = 0  # no positive: no curve
    curves = pr_curves(torch.tensor(scores), torch.tensor(targets))
    assert curves[3] is None
    for c in range(3):
        precision, recall, _ = sklearn_metrics.precision_recall_curve(targets[:, c], scores[:, c])
        ours = sorted(zip(curves[c]["recall"], curves[c]["precision"], strict=True))
        theirs = sorted(zip(recall.round(6), precision.round(6), strict=True))
        assert np.allclose(ours, theirs)
