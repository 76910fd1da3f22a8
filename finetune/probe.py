"""Classifiers fitted on cached features: the linear probe and weighted k-nearest neighbours.

The probe is multinomial logistic regression fitted full-batch with L-BFGS (as scikit-learn's
``LogisticRegression(solver="lbfgs")``; its ``C`` is ``1 / (weight_decay * n)``) on centred
features scaled to unit mean variance; the weight decay is the candidate that scores best on
held-out training features, refitted on all of them. The standardization is folded into the weights,
so the head is an ordinary linear layer on the backbone's raw features.

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

from finetune.data.sources import stratified_mask

BATCHED = 1 << 25  # logits (problems x images x classes) fitted as one batched problem


@dataclass
class Probe:
    """A fitted linear head on raw features: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, D)
    bias: torch.Tensor  # (classes,)
    weight_decay: float  # the chosen candidate
    val_acc: float | None  # its accuracy on the held-out features (None: one candidate)
    seconds: float  # choosing and fitting
    scores: dict[str, float]  # every candidate's held-out accuracy


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


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: list[float],
              val: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
              val_fraction: float = 0.2, views: int = 1) -> Probe:
    """The linear probe on features ``x`` (N, D), labels ``y``: every weight decay fitted on
    the training features and scored on ``val`` (None: a seeded, per-class fifth held out of
    ``x``); the best (ties: the larger decay) is kept, refitted on every training feature
    when a fifth was held out. All the fits are one batched problem (:func:`fit_logistic`).
    ``views`` > 1: rows ``v * N + i`` are views of image ``i``, held out together."""
    start = time.perf_counter()
    x, y = x.float(), y.long()
    mean, std = standardize(x)
    z = (x - mean) / std
    decays = sorted({float(w) for w in weight_decays}, reverse=True)
    everything = torch.ones(len(y), dtype=torch.bool)
    if len(decays) == 1:
        masks, val_z, val_y = everything[None], None, None
    elif val is None or not len(val[1]):  # group 0 fits four fifths and is scored on the
        n = len(y) // views  # fifth; group 1 fits all
        held = stratified_mask(y[:n], classes, max(1, round(val_fraction * n)), seed)
        held = held.repeat(views)
        masks, val_z, val_y = torch.stack([~held, everything]), z[held], y[held]
    else:
        masks, val_z, val_y = everything[None], (val[0].float() - mean) / std, val[1].long()
    if len(masks) * len(decays) * len(y) * classes <= BATCHED:
        w, b = fit_logistic(z, y, classes, decays, masks)
    else:  # too large to batch: one decay at a time
        w, b = (torch.cat(t, 1) for t in zip(*(fit_logistic(z, y, classes, [wd], masks)
                                                for wd in decays), strict=True))
    scores = {} if val_z is None else {
        f"{wd:g}": accuracy(val_z @ w[0, i].T + b[0, i], val_y) for i, wd in enumerate(decays)}
    best = max(range(len(decays)), key=lambda i: scores[f"{decays[i]:g}"]) if scores else 0
    w, b = w[-1, best], b[-1, best]
    # logits = ((x - mean) / std) @ w.T + b = x @ (w / std).T + (b - (w / std) @ mean)
    weight = w / std
    bias = b - weight @ mean
    return Probe(weight, bias, decays[best], scores[f"{decays[best]:g}"] if scores else None,
                 time.perf_counter() - start, scores)


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
