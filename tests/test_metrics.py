"""Metrics: confusion matrix and mIoU / mAcc / aAcc against hand-computed values."""

import json
import math

import pytest
import torch

from segformer.metrics import confusion_matrix, format_table, json_safe, metrics_from_confusion


def test_confusion_matrix_by_hand():
    # 3 classes; 255 pixels are ignored whatever is predicted there
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0], [1, 255, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0], [2, 1, 2, 0]])
    expected = torch.tensor([
        # predicted: 0  1  2
        [3, 1, 0],  # true 0: (0,0) (0,1)->1 (1,3) (2,3)
        [0, 2, 1],  # true 1: (0,2) (0,3) (2,0)->2
        [1, 0, 2],  # true 2: (1,0) (1,1)->0 (2,2)
    ])
    matrix = confusion_matrix(pred, label, 3)
    assert matrix.dtype == torch.int64
    assert torch.equal(matrix, expected)

    m = metrics_from_confusion(matrix, ["a", "b", "c"])
    iou = [3 / (4 + 4 - 3), 2 / (3 + 3 - 2), 2 / (3 + 3 - 2)]
    acc = [3 / 4, 2 / 3, 2 / 3]
    assert [c["IoU"] for c in m["per_class"]] == pytest.approx(iou)
    assert [c["Acc"] for c in m["per_class"]] == pytest.approx(acc)
    assert m["mIoU"] == pytest.approx(sum(iou) / 3)
    assert m["mAcc"] == pytest.approx(sum(acc) / 3)
    assert m["aAcc"] == pytest.approx(7 / 10)
    assert [c["name"] for c in m["per_class"]] == ["a", "b", "c"]
    assert [c["pixels"] for c in m["per_class"]] == [4, 3, 3]


def test_absent_classes():
    """A class in neither truth nor prediction has no IoU (left out of the means, null in
    JSON); a class predicted but never true has IoU 0 (counted) and no accuracy."""
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = metrics_from_confusion(confusion_matrix(pred, label, 4))
    ious = [c["IoU"] for c in m["per_class"]]
    assert ious[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(ious[3])
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["mAcc"] == pytest.approx(0.75)  # classes 2 and 3 have no true pixels
    data = json.loads(json.dumps(json_safe(m)))
    assert data["per_class"][3]["IoU"] is None and data["per_class"][2]["Acc"] is None
    assert "n/a" in format_table(m)


def test_matrix_adds_over_batches_and_matches_a_count(fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    label = torch.randint(0, 5, (3, 17, 13), generator=generator)
    label[torch.rand(label.shape, generator=generator) < 0.2] = 255
    pred = torch.randint(0, 5, (3, 17, 13), generator=generator)
    whole = confusion_matrix(pred, label, 5)
    parts = sum(confusion_matrix(pred[i], label[i], 5) for i in range(3))
    assert torch.equal(whole, parts)
    counted = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            counted[t, p] += 1
    assert torch.equal(whole, counted)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)
