"""Classification metrics from a confusion matrix (pure) and the one all-reduce helper."""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a signal that reached one rank)."""
    return all_reduce_sum(torch.tensor([int(flag)])).item() > 0


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
