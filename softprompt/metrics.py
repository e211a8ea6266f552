"""Classification metrics from a confusion matrix. Pure."""

from __future__ import annotations

import torch


def confusion(labels: torch.Tensor, preds: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true label, columns = prediction."""
    idx = labels.long() * n_classes + preds.long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_weights(labels: list[int], label_names: list[str]) -> list[float]:
    """Per class N / (C x count): every class's examples weigh N / C in all (sklearn's "balanced")."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(label_names))
    if missing := [name for name, n in zip(label_names, counts.tolist()) if n == 0]:
        raise ValueError(f"--class_weights balanced: class(es) {missing} have no training example")
    return (len(labels) / (len(label_names) * counts.double())).tolist()


def from_confusion(cm: torch.Tensor, label_names: list[str]) -> dict:
    """accuracy, macro-F1, per-class F1, the confusion matrix and predicted-label counts."""
    cm = cm.double()
    tp = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    # F1 = 2TP / (2TP + FP + FN); a class never predicted and never present has F1 0 here, as in sklearn.
    denom = predicted + actual
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    total = cm.sum().item()
    return {
        "accuracy": tp.sum().item() / total if total else 0.0,
        "macro_f1": f1.mean().item(),
        "f1": {name: f1[i].item() for i, name in enumerate(label_names)},
        "confusion": cm.long().tolist(),
        "pred_counts": {name: int(predicted[i]) for i, name in enumerate(label_names)},
        "n": int(total),
    }
