import pytest
import torch

from softprompt import metrics


def test_confusion_and_metrics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 1])
    cm = metrics.confusion(labels, preds, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    m = metrics.from_confusion(cm, ["a", "b", "c"])
    assert m["accuracy"] == 3 / 6
    # a: tp 1, fp 1, fn 1 -> 2/4; b: tp 2, fp 2, fn 1 -> 4/7; c: never right -> 0
    assert m["f1"] == {"a": 0.5, "b": 4 / 7, "c": 0.0}
    assert abs(m["macro_f1"] - (0.5 + 4 / 7) / 3) < 1e-12
    assert m["pred_counts"] == {"a": 2, "b": 4, "c": 0}
    assert m["n"] == 6


def test_balanced_weights_by_hand():
    # 6 examples: 3 of a, 2 of b, 1 of c -> 6 / (3 x count); each class then weighs 6 / 3 = 2 in all.
    w = metrics.balanced_weights([0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert w == pytest.approx([2 / 3, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"\['c'\] have no training example"):
        metrics.balanced_weights([0, 1, 1], ["a", "b", "c"])
