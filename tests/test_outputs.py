import math

import pytest
import torch

from lightning_tda import outputs


def brute_margin(logits, y):
    rows = []
    for z, label in zip(logits.tolist(), y.tolist()):
        others = [v for j, v in enumerate(z) if j != label]
        m = max(others)
        rows.append(z[label] - (m + math.log(sum(math.exp(v - m) for v in others))))
    return torch.tensor(rows, dtype=torch.float64)


def test_margin_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, 7, (50,), generator=g)
    torch.testing.assert_close(outputs.margin_from_logits(logits, y), brute_margin(logits, y))


def test_margin_is_stable_for_confident_models():
    logits = torch.tensor([[60.0, -40.0, -40.0], [-30.0, 50.0, 0.0]])
    y = torch.tensor([0, 1])
    reference = brute_margin(logits.double(), y)
    got = outputs.margin_from_logits(logits, y)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-4)
    # out-to-loss 1 - p_y: tiny but exact, never a cancelled 0 - 0
    otl = outputs.out_to_loss_from_logits(logits.double(), y)
    p = torch.softmax(logits.double(), 1)[torch.arange(2), y]
    assert otl[1] > 0 and torch.allclose(otl[1], 1 - p[1], rtol=1e-6)


def test_loss_and_probability():
    logits = torch.randn(9, 4)
    y = torch.randint(0, 4, (9,))
    torch.testing.assert_close(
        outputs.loss_from_logits(logits, y), torch.nn.functional.cross_entropy(logits, y, reduction="none")
    )
    torch.testing.assert_close(
        outputs.correct_class_probability_from_logits(logits, y), torch.softmax(logits, 1)[torch.arange(9), y]
    )
    module = torch.nn.Identity()
    torch.testing.assert_close(outputs.margin(module, logits, y), outputs.margin_from_logits(logits, y))


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="out of range"):
        outputs.margin_from_logits(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="labels must be integers"):
        outputs.loss_from_logits(torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown output_fn"):
        outputs.resolve_output_fn("accuracy")
    with pytest.raises(ValueError, match="one scalar per example"):
        outputs.check_output(torch.zeros(3, 4), 3)
