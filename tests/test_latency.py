"""The per-key batch-time model, client patience and the AIMD cap, alone."""

from __future__ import annotations

import pytest

from batchserve.sched.latency import BatchTimeModel
from batchserve.sched.patience import AimdCap, Patience


def test_model_fits_fixed_plus_per_image_cost() -> None:
    model = BatchTimeModel()
    for n in (1, 2, 4, 8, 3):
        model.observe(n, 0.5 + 0.3 * n)
    a, b = model.coefficients() or (0, 0)
    assert a == pytest.approx(0.5) and b == pytest.approx(0.3)
    assert model.predict(6) == pytest.approx(2.3)
    assert model.largest_within(2.0, 8) == 5  # 0.5 + 0.3*5 = 2.0
    assert model.largest_within(0.7, 8) == 0


def test_one_size_seen_assumes_no_batching_gain() -> None:
    model = BatchTimeModel()
    assert model.predict(1) is None and model.largest_within(1.0, 8) == 8
    model.observe(1, 2.0)
    assert model.predict(4) == pytest.approx(8.0)  # pessimistic until a bigger batch ran


def test_model_follows_a_machine_that_slows_down() -> None:
    model = BatchTimeModel(decay=0.7)
    for n in (1, 4) * 5:
        model.observe(n, 1.0 * n)
    for n in (1, 4) * 10:
        model.observe(n, 2.0 * n)
    assert model.predict(4) == pytest.approx(8.0, rel=0.05)


def test_patience_is_a_low_percentile_of_recent_give_ups() -> None:
    patience = Patience(quantile=0.1, min_samples=5, window_s=100)
    for age in (9.0, 10.0, 10.5, 11.0, 60.0):
        assert patience.estimate(0.0) is None
        patience.gave_up(age, now=0.0)
    estimate = patience.estimate(0.0)
    assert estimate is not None and 9.0 <= estimate <= 10.0  # the 60 s outlier barely counts
    assert patience.estimate(101.0) is None  # forgotten once outside the window


def test_aimd_halves_on_leavers_and_adds_one_per_full_batch_kept() -> None:
    cap = AimdCap(limit=8)
    cap.clients_left()
    assert cap.cap == 4
    cap.clients_stayed(size=2)  # did not test the cap: no change
    assert cap.cap == 4
    for expected in (5, 6, 7, 8, 8):
        cap.clients_stayed(size=cap.cap)
        assert cap.cap == expected
    for _ in range(5):
        cap.clients_left()
    assert cap.cap == 1
