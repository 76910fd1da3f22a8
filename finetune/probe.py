"""Classifiers fitted on cached features: the linear probe and weighted k-nearest neighbours.

Two linear probes (``finetune.probe``), both on centred features scaled to unit mean variance,
both with the weight decay chosen among candidates by accuracy on held-out training features
(a seeded, per-class fifth, or the validation split) and refitted on all of them:

- ``ridge`` (the default): least squares onto one-hot targets ("ridge classification", as
  scikit-learn's ``RidgeClassifier``), every candidate solved exactly from one eigendecomposition
  (milliseconds where L-BFGS takes a hundred full passes), then one temperature fitted on the
  held-out features so that the softmax of the head's logits are calibrated probabilities;
- ``logistic``: multinomial logistic regression fitted full-batch with L-BFGS (as
  scikit-learn's ``LogisticRegression(solver="lbfgs")``; its ``C`` is
  ``1 / (weight_decay * n)``), every candidate in one batched problem.

The standardization (and temperature) is folded into the weights, so the head is an ordinary
linear layer on the backbone's raw features.

kNN is DINOv2's protocol: cosine similarity to every training feature, the ``k`` nearest
vote with weight ``exp(similarity / temperature)``, the class scores normalised to
probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import PROBES
from finetune.data.sources import stratified_mask

# Each probe's weight-decay candidates when finetune.probe_weight_decay is not given: a ridge
# penalty is on the scale of the standardized features' variance (1), a logistic one per image.
DECAYS = {"ridge": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0],
          "logistic": [1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
BATCHED = 1 << 25  # logits (problems x images x classes) fitted as one batched problem


@dataclass
class Probe:
    """A fitted linear head on raw features: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, D)
    bias: torch.Tensor  # (classes,)
    weight_decay: float  # the chosen candidate
    val_acc: float | None  # its accuracy on the held-out features (None: nothing held out)
    seconds: float  # choosing and fitting
    scores: dict[str, float]  # every candidate's held-out accuracy
    kind: str  # PROBES
    temperature: float  # the ridge scores' scale (folded into weight and bias); logistic: 1


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: list[float],
                 masks: torch.Tensor | None = None, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (G, C, classes, D), bias (G, C, classes))``: for every row subset ``g`` of
    ``masks`` (G, N) (None: one, all rows) and every weight decay ``c``, the head minimising
    the subset's mean cross-entropy + weight_decay / 2 * |weight|^2, full batch.

    The G x C problems are independent, so they are solved as one: L-BFGS on the sum of their
    losses steps them all at once, one batched product a step (G x C times one problem's
    arithmetic, but one step's overhead; :func:`fit_probe` batches up to ``BATCHED`` logits).
    Standardize ``x`` first: L-BFGS converges in far fewer steps."""
    masks = torch.ones(1, len(y), dtype=torch.bool) if masks is None else masks
    decays = torch.tensor(weight_decays, dtype=x.dtype)
    g, c, n = len(masks), len(decays), len(y)
    w = torch.zeros(g, c, classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(g, c, classes, dtype=x.dtype, requires_grad=True)
    weights = masks.to(x.dtype)[:, None, :] / masks.sum(1).clamp_min(1)[:, None, None]
    target = y[None, None, :, None].expand(g, c, n, 1)
    # scikit-learn's defaults: 100 iterations, 10 corrections kept
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("nd,gckd->gcnk", x, w) + b[:, :, None, :]
        nll = -logits.log_softmax(-1).gather(-1, target).squeeze(-1)  # (G, C, N)
        loss = (nll * weights).sum() + (decays / 2 * w.square().sum((-1, -2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: list[float],
              masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped as :func:`fit_logistic`'s: for every row subset and weight decay, the head
    minimising the subset's mean squared error to one-hot targets / 2 + weight_decay / 2 *
    |weight|^2 (the bias free), in closed form, on the D x D covariance or, when smaller, the
    N x N Gram matrix: (XᵀX/n + λ)⁻¹XᵀT/n = Xᵀ(XXᵀ/n + λ)⁻¹T/n."""
    masks = torch.ones(1, len(y), dtype=torch.bool) if masks is None else masks
    onehot = F.one_hot(y, classes).double()
    w = torch.zeros(len(masks), len(weight_decays), classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(len(masks), len(weight_decays), classes, dtype=torch.float64)
    for g, m in enumerate(masks):
        if not m.any():
            continue
        xm, tm = x[m], onehot[m]
        n, mean, target_mean = len(xm), xm.mean(0), tm.mean(0)
        xc, tc = xm - mean, tm - target_mean
        gram = n < x.shape[1]
        # the product in x's precision (fast), the solution in double
        system = (xc @ xc.T if gram else xc.T @ xc).double() / n
        rhs = tc if gram else (xc.T @ tc.to(xc.dtype)).double()  # no double copy of x
        coef = _ridge_coefficients(system, rhs, n, weight_decays)
        w[g] = (coef.to(xc.dtype) @ xc).double() if gram else coef
        b[g] = target_mean - w[g] @ mean.double()
    return w.to(x.dtype), b.to(x.dtype)


def _ridge_coefficients(system: torch.Tensor, rhs: torch.Tensor, n: int,
                        weight_decays: list[float]) -> torch.Tensor:
    """``(system + λ)⁻¹ rhs / n`` for every decay λ, as (decays, classes, r): one decay is a
    Cholesky solve; several share one eigendecomposition (and a singular system without decay
    gets its pseudo-inverse)."""
    if len(weight_decays) == 1 and weight_decays[0] > 0:
        eye = torch.eye(len(system), dtype=system.dtype)
        factor, info = torch.linalg.cholesky_ex(system + weight_decays[0] * eye)
        if not info:
            return torch.cholesky_solve(rhs / n, factor).T[None]
    s, vec = torch.linalg.eigh(system)
    decays = torch.tensor(weight_decays, dtype=torch.float64)
    total = s.clamp_min(0)[:, None] + decays[None, :]  # (r, decays)
    # below 1e-6 of the largest: float32 rounding of the system, not variance (decay 0)
    inverse = torch.where(total > 1e-6 * s.abs().max().clamp_min(1e-30), 1 / total, 0)
    return (vec @ (inverse.T[:, :, None] * (vec.T @ rhs / n))).transpose(1, 2)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, low: float = 1e-2,
                    high: float = 1e3, smoothing: float = 1e-3) -> float:
    """The scale ``t`` (in [low, high]) minimising the mean cross-entropy of
    ``softmax(t * logits)`` against the labels smoothed by ``smoothing`` (a held-out set that
    is classified perfectly then gets a finite scale, not the bound): the loss is convex in
    ``t``, so its derivative (expected minus target logit) is increasing, and bisection on
    log t finds its zero."""
    logits = logits.double()
    true = ((1 - smoothing) * logits.gather(1, y[:, None]).squeeze(1)
            + smoothing * logits.mean(1))

    def slope(t: float) -> float:
        return ((logits * (t * logits).softmax(1)).sum(1) - true).mean().item()

    lo, hi = torch.tensor(low).log().item(), torch.tensor(high).log().item()
    if not len(y) or slope(low) >= 0:
        return low
    if slope(high) <= 0:
        return high
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(torch.tensor(mid).exp().item()) < 0 else (lo, mid)
    return torch.tensor((lo + hi) / 2).exp().item()


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and one scale for all features (the root mean variance), as a
    ``std`` per feature: L-BFGS is well conditioned, and a feature that barely varies on the
    training images gets no outsized weight that blows up on other images (a per-feature std
    would give it one)."""
    mean = x.mean(0)
    scale = (x - mean).square().mean().sqrt().clamp_min(1e-12)
    return mean, scale.expand_as(mean)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def held_out(z: torch.Tensor, y: torch.Tensor, classes: int, hold: bool,
             val: tuple[torch.Tensor, torch.Tensor] | None, seed: int, val_fraction: float,
             views: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(masks (G, N), val_z, val_y)``: the row subsets to fit and the features that score
    them. ``val`` given (and not empty): fit all rows, score on it. Else ``hold``: group 0 fits
    all but a seeded per-class fifth (every view of an image together), which scores it, and
    group 1 fits all; not ``hold``: fit all rows, nothing scored."""
    everything = torch.ones(len(y), dtype=torch.bool)
    if val is not None and len(val[1]):
        return everything[None], val[0], val[1].long()
    if not hold:
        return everything[None], None, None
    n = len(y) // views  # rows v * n + i are views of image i
    held = stratified_mask(y[:n], classes, max(1, round(val_fraction * n)), seed).repeat(views)
    return torch.stack([~held, everything]), z[held], y[held]


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int,
              weight_decays: list[float] | None = None,
              val: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
              val_fraction: float = 0.2, views: int = 1, kind: str = "ridge") -> Probe:
    """The linear probe ``kind`` (PROBES) on features ``x`` (N, D), labels ``y``: every weight
    decay (None: ``DECAYS[kind]``) fitted on the training features and scored on ``val``
    (None: a seeded, per-class fifth held out of ``x``); the best (ties: the larger decay) is
    kept, refitted on every training feature when a fifth was held out. A ridge probe holds
    out even for one candidate: its temperature is fitted on the held-out scores.
    ``views`` > 1: rows ``v * N + i`` are views of image ``i``, held out together."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; valid: {', '.join(PROBES)}")
    start = time.perf_counter()
    x, y = x.float(), y.long()
    mean, std = standardize(x)
    z = (x - mean) / std
    decays = sorted({float(w) for w in weight_decays or DECAYS[kind]}, reverse=True)
    val = None if val is None else ((val[0].float() - mean) / std, val[1])
    masks, val_z, val_y = held_out(z, y, classes, len(decays) > 1 or kind == "ridge",
                                   val, seed, val_fraction, views)
    if kind == "ridge":  # closed form: every decay on the fitting rows, then the chosen on all
        w, b = fit_ridge(z, y, classes, decays, masks[:1])
    else:  # L-BFGS: both row subsets and every decay as one batched problem
        w, b = _fit_logistic_batches(z, y, classes, decays, masks)
    scores = {} if val_z is None else {
        f"{wd:g}": accuracy(val_z @ w[0, i].T + b[0, i], val_y) for i, wd in enumerate(decays)}
    best = max(range(len(decays)), key=lambda i: scores[f"{decays[i]:g}"]) if scores else 0
    w, b, t = w[-1, best], b[-1, best], 1.0
    if kind == "ridge":  # scaled to calibrated probabilities on the held-out features
        t = fit_temperature(val_z @ w.T + b, val_y)
        if len(masks) > 1:
            w, b = (v[0, 0] for v in fit_ridge(z, y, classes, [decays[best]]))
        w, b = t * w, t * b
    # logits = ((x - mean) / std) @ w.T + b = x @ (w / std).T + (b - (w / std) @ mean)
    weight = w / std
    bias = b - weight @ mean
    return Probe(weight, bias, decays[best], scores[f"{decays[best]:g}"] if scores else None,
                 time.perf_counter() - start, scores, kind, t)


def _fit_logistic_batches(z: torch.Tensor, y: torch.Tensor, classes: int, decays: list[float],
                          masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_logistic` over every decay at once, or one decay at a time when the batched
    logits would exceed ``BATCHED``."""
    if len(masks) * len(decays) * len(y) * classes <= BATCHED:
        return fit_logistic(z, y, classes, decays, masks)
    return tuple(torch.cat(t, 1) for t in zip(*(fit_logistic(z, y, classes, [wd], masks)
                                                 for wd in decays), strict=True))


def knn_log_probs(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor,
                  classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024
                  ) -> torch.Tensor:
    """Log-probabilities of ``query``'s classes from its ``k`` nearest features in ``bank``
    (cosine similarity), each voting ``exp(similarity / temperature)``; ``chunk`` queries at a
    time bound the memory of the similarities."""
    head = KNNHead(bank, bank_labels, classes, k, temperature)
    return torch.cat([head(q) for q in query.split(chunk)]) if len(query) else \
        torch.zeros(0, classes)


class KNNHead(nn.Module):
    """A classifier that is weighted k-NN over stored training features: ``forward`` takes
    the backbone's features and returns class log-probabilities (so softmax, argmax and the
    evaluation's loss read them as logits)."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, classes: int, k: int = 20,
                 temperature: float = 0.07) -> None:
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.register_buffer("labels", labels.long())
        self.classes, self.k, self.temperature = classes, min(k, len(labels)), temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.normalize(x.float().flatten(1), dim=1)
        sims, idx = (q @ self.bank.T).topk(self.k, dim=1)
        # exp((s - s_max) / T): the same vote once normalised, and no overflow at a small T
        weights = ((sims - sims[:, :1]) / self.temperature).exp()
        scores = torch.zeros(q.shape[0], self.classes, dtype=weights.dtype, device=q.device)
        scores = scores.scatter_add(1, self.labels[idx], weights)
        return (scores / scores.sum(1, keepdim=True)).clamp_min(1e-12).log()
