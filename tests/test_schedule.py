"""The reduce-on-plateau schedule against a hand-run sequence of validation metrics."""

from __future__ import annotations

import math

import pytest

from regpipe.engine.schedule import Plateau


def test_scale_after_each_report_matches_the_hand_run_rule() -> None:
    # factor 0.5, patience 2: a reduction after 2 evaluations in a row without beating the best, then the
    # count starts again.
    metrics = [0.50, 0.60, 0.60, 0.55, 0.70, 0.69, 0.69, 0.68, 0.68, 0.71]
    #          best  best  bad1  bad2->0.5 best bad1 bad2->0.25 bad1 bad2->0.125 best
    expected = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    plateau = Plateau(factor=0.5, patience=2)
    assert [plateau.report(m) for m in metrics] == expected
    assert plateau.reductions == 3 and plateau.best == 0.71 and plateau.bad_evals == 0


def test_min_delta_and_min_scale() -> None:
    plateau = Plateau(factor=0.1, patience=1, min_delta=0.05, min_scale=0.05)
    # 0.52 does not beat 0.5 by more than 0.05: a reduction; the scale stops at min_scale.
    assert [plateau.report(m) for m in (0.5, 0.52, 0.9, 0.9, 0.9)] == [1.0, 0.1, 0.1, 0.05, 0.05]


def test_state_round_trip_continues_identically() -> None:
    metrics = [0.3, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4]
    whole = Plateau(factor=0.5, patience=2)
    expected = [whole.report(m) for m in metrics]
    first = Plateau(factor=0.5, patience=2)
    head = [first.report(m) for m in metrics[:3]]
    second = Plateau(factor=0.5, patience=2)
    second.load_state_dict(first.state_dict())
    assert head + [second.report(m) for m in metrics[3:]] == expected
    assert second.state_dict() == whole.state_dict()


def test_state_of_other_settings_is_refused() -> None:
    with pytest.raises(ValueError, match=r"patience=2.*patience=3"):
        Plateau(factor=0.5, patience=3).load_state_dict(Plateau(factor=0.5, patience=2).state_dict())


@pytest.mark.parametrize("changes, fragment", [
    ({"factor": 1.0}, "factor must be a number in \\(0, 1\\), got 1.0"),
    ({"factor": 0.0}, "factor must be a number in \\(0, 1\\), got 0.0"),
    ({"factor": -0.5}, "got -0.5"),
    ({"patience": 0}, "patience must be an integer >= 1, got 0"),
    ({"patience": 1.5}, "got 1.5"),
    ({"min_delta": -1.0}, "min_delta .* got -1.0"),
])
def test_bad_settings_are_named(changes: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Plateau(**{"factor": 0.5, "patience": 2, **changes})


@pytest.mark.parametrize("metric", [math.nan, math.inf, "0.5"])
def test_non_finite_metric_is_refused(metric: object) -> None:
    plateau = Plateau(factor=0.5, patience=2)
    with pytest.raises(ValueError, match=f"finite number, got {metric!r}".replace("(", r"\(")):
        plateau.report(metric)  # type: ignore[arg-type]
    assert plateau.state_dict()["bad_evals"] == 0  # nothing was counted
