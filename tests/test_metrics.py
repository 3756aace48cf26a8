"""Exact validation metrics: the count-based reducer and the kNN vote."""

import pytest
import torch
import torch.nn.functional as F

from trial_common import ExactMeanReducer, knn_predict


def test_reducer_weighs_uneven_batches_by_count():
    reducer = ExactMeanReducer()
    # A full batch of 1024 with 512 correct and a last batch of 16 with all 16 correct.
    reducer.update("validation_accuracy", torch.tensor(512), 1024)
    reducer.update("validation_accuracy", torch.tensor(16), 16)
    metrics = reducer.cross_slot_reduce([reducer.per_slot_reduce()])
    assert metrics["validation_accuracy"] == pytest.approx(528 / 1040)
    assert metrics["validation_accuracy"] != pytest.approx((0.5 + 1.0) / 2)


def test_reducer_sums_over_slots_before_dividing():
    slot_a, slot_b = ExactMeanReducer(), ExactMeanReducer()
    slot_a.update("validation_accuracy", torch.tensor(90), 100)
    slot_b.update("validation_accuracy", torch.tensor(1), 3)
    metrics = slot_a.cross_slot_reduce([slot_a.per_slot_reduce(), slot_b.per_slot_reduce()])
    assert metrics["validation_accuracy"] == pytest.approx(91 / 103)


def test_reducer_skips_metric_without_samples():
    reducer = ExactMeanReducer()
    assert reducer.cross_slot_reduce([reducer.per_slot_reduce()]) == {}


def test_reducer_reset_clears_sums():
    reducer = ExactMeanReducer()
    reducer.update("loss", torch.tensor(3.0), 1)
    reducer.reset()
    assert reducer.per_slot_reduce() == {}


def test_knn_predict_majority_of_neighbours():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    predictions = knn_predict(queries, bank, labels, num_classes=2, k=2, temperature=0.1)
    assert predictions.tolist() == [0, 1]


def test_knn_predict_weights_close_neighbour_higher():
    # One very close neighbour of class 1 outvotes two distant ones of class 0.
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([1, 0, 0])
    queries = F.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    predictions = knn_predict(queries, bank, labels, num_classes=2, k=3, temperature=0.1)
    assert predictions.tolist() == [1]


def test_knn_predict_caps_k_at_bank_size():
    bank = F.normalize(torch.randn(5, 4), dim=1)
    labels = torch.arange(5)
    predictions = knn_predict(bank, bank, labels, num_classes=5, k=200, temperature=0.07)
    assert predictions.tolist() == labels.tolist()
