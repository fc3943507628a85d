"""Paired bootstrap intervals of accuracy differences."""

import numpy as np
import pytest

from offsite.errors import ConfigError
from offsite.stats import as_array, paired_bootstrap, seed_mean


def test_identical_settings_differ_by_nothing():
    a = "0110101101" * 20
    iv = paired_bootstrap([a], [a])
    assert (iv.diff, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.significant


def test_a_clear_difference_is_significant_and_the_interval_covers_the_point():
    rng = np.random.default_rng(0)
    b = (rng.random(500) < 0.5).astype(int)
    a = b.copy()
    a[rng.choice(np.flatnonzero(b == 0), 60, replace=False)] = 1  # a fixes 60 of b's errors
    iv = paired_bootstrap([a.tolist()], [b.tolist()])
    assert iv.diff == pytest.approx(12.0) and iv.low < 12.0 < iv.high and iv.significant
    # paired: the interval is much narrower than two independent binomial intervals (~ +-6 points)
    assert iv.high - iv.low < 7


def test_tasks_are_weighted_equally_and_resampled_separately():
    small_a, small_b = "1" * 10, "0" * 10  # +100 points on a 10-doc task
    big = "01" * 500  # no difference on a 1,000-doc task
    iv = paired_bootstrap([small_a, big], [small_b, big])
    assert iv.diff == pytest.approx(50.0) and iv.low == pytest.approx(50.0) and iv.n_docs == 1010


def test_seeds_average_per_doc():
    assert seed_mean(["101", "100"]).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ConfigError):
        seed_mean(["101", "10"])


@pytest.mark.parametrize("a, b", [(["01"], ["011"]), ([], []), (["01"], ["01", "10"])])
def test_mismatched_outcomes_are_refused(a, b):
    with pytest.raises(ConfigError):
        paired_bootstrap(a, b)


def test_outcome_strings_are_checked():
    assert as_array("0110").tolist() == [0, 1, 1, 0]
    with pytest.raises(ConfigError, match="0 and 1"):
        as_array("01x")
