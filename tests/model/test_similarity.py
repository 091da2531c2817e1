"""What similarity means here: the correlations of cosine with label, against scipy."""

import numpy as np
import pytest
import scipy.stats
import torch

from minilm_sts.evaluation.correlations import correlations


@pytest.mark.parametrize("kind", ["continuous", "binary-ties", "ties-in-scores"])
def test_correlations_match_scipy(kind):
    rng = np.random.default_rng(0)
    labels = rng.random(1000) if kind == "continuous" else rng.integers(0, 2, 1000).astype(float)
    scores = 0.5 * labels + rng.normal(0, 0.3, 1000)
    if kind == "ties-in-scores":
        scores = np.round(scores, 1)
    got = correlations(torch.tensor(scores), torch.tensor(labels))
    assert got["pearson_cosine"] == pytest.approx(scipy.stats.pearsonr(labels, scores)[0], abs=1e-5)
    assert got["spearman_cosine"] == pytest.approx(scipy.stats.spearmanr(labels, scores)[0], abs=1e-5)
