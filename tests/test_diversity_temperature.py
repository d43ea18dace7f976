"""Temperature scaling: the fitted temperature minimises the NLL (against a brute-force grid), and
it lowers every member's NLL on held-out data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tda.diversity import DiversitySettings, analyze_diversity
from lightning_tda.diversity.temperature import fit_temperature, negative_log_likelihood, temperature_scale


def _members(n: int, scales=(4.0, 0.3, 1.0, 2.5), seed: int = 0):
    """Labels drawn from softmax(z*) and members whose logits are scale * z* + noise: over-
    (scale > 1) and under-confident (scale < 1) models of the same task."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    logits = torch.stack([s * z + 0.3 * torch.randn(n, 6, generator=g, dtype=torch.float64) for s in scales])
    return logits, y


def test_fitted_temperature_is_the_grid_minimiser():
    logits, y = _members(400)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    for m in range(logits.shape[0]):
        t = fit_temperature(logits[m], y)
        brute = grid[np.argmin([negative_log_likelihood(logits[m], y, g) for g in grid])]
        assert t == pytest.approx(brute, rel=4e-3)
        assert negative_log_likelihood(logits[m], y, t) <= min(
            negative_log_likelihood(logits[m], y, t * f) for f in (0.99, 1.01)
        )


def test_scaling_lowers_each_members_nll_on_held_out_data():
    logits, y = _members(3000)
    fit, test = slice(0, 1500), slice(1500, 3000)  # fitted on one held-out half, scored on the other
    for m, scale in enumerate((4.0, 0.3, 1.0, 2.5)):
        t = fit_temperature(logits[m, fit], y[fit])
        before = negative_log_likelihood(logits[m, test], y[test])
        after = negative_log_likelihood(temperature_scale(logits[m, test], t), y[test])
        assert after < before, (m, scale, t)
        if scale != 1.0:
            assert (t > 1) == (scale > 1)  # over-confident members are cooled, under-confident sharpened
    # and through the analysis: every member's NLL on the held-out split and on the evaluation split
    result = analyze_diversity(logits[:, test], y[test], held_out=(logits[:, fit], y[fit]))
    assert (result.held_out_nll_after < result.held_out_nll_before).all()
    assert (result.nll_after < result.nll_before).all()
    assert np.array_equal(result.predictions, logits[:, test].argmax(-1).numpy())  # labels unchanged


def test_probabilities_are_read_as_log_probabilities():
    logits, y = _members(500)
    t = fit_temperature(logits[0], y)
    assert fit_temperature(logits[0].softmax(1), y) == pytest.approx(t, rel=1e-6)


def test_bounds_clip_and_errors():
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(z, torch.tensor([0, 1]), bounds=(0.5, 10.0)) == 0.5  # separable: T -> low bound
    with pytest.raises(ValueError, match="predicted labels cannot be rescaled"):
        fit_temperature(torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-empty held-out"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, torch.tensor([0, 1]), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_scale(z, 0.0)


def test_temperature_scaling_without_a_held_out_split_is_refused():
    logits, y = _members(50)
    with pytest.raises(ValueError, match="temperature scaling needs a held-out split"):
        analyze_diversity(logits, y)
    unscaled = analyze_diversity(logits, y, settings=DiversitySettings(temperature_scaling=False))
    assert np.all(unscaled.temperatures == 1.0) and unscaled.n_held_out == 0
