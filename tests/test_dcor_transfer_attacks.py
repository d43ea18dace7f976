"""FGSM and PGD against their closed forms on linear models; the transfer evaluation and its result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_tda.data import TensorImageDataset, load_digits_tensors
from lightning_tda.dcor.attacks import fgsm, margin_loss, pgd
from lightning_tda.dcor.transfer_attacks import TransferAttackResult, evaluate_transfer, train_diverse_family


def _linear(d: int, k: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, k).double()


def _closed_form(model: nn.Linear, x, y, eps):
    """eps * sign(w_y' - w_y), y' the runner-up class: the step that lowers the margin."""
    with torch.no_grad():
        logits = model(x)
        runner_up = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), -torch.inf).argmax(1)
        w = model.weight
        return x + eps * torch.sign(w[runner_up] - w[y])


def test_fgsm_margin_loss_is_the_closed_form_on_a_linear_model():
    g = torch.Generator().manual_seed(0)
    model = _linear(12, 5, 0)
    x = 0.3 + 0.4 * torch.rand(64, 12, generator=g, dtype=torch.float64)  # clipping to [0, 1] never binds
    y = torch.randint(0, 5, (64,), generator=g)
    for eps in (0.0, 0.05, 0.2):
        got = fgsm(model, x, y, eps, loss="margin")
        torch.testing.assert_close(got, _closed_form(model, x, y, eps), rtol=0, atol=1e-15)
    # the margin goes down by exactly eps * ||w_y - w_y'||_1 (per example)
    got = fgsm(model, x, y, 0.1, loss="margin")
    assert (margin_loss(model(got), y) > margin_loss(model(x), y)).all()


def test_fgsm_cross_entropy_and_pgd_reach_the_corner_for_two_classes():
    # two classes: the cross-entropy gradient is p_y' (w_y' - w_y), the same sign as the margin's,
    # and PGD's path never changes direction: it ends at the corner x + eps * sign(w_y' - w_y)
    g = torch.Generator().manual_seed(1)
    model = _linear(10, 2, 1)
    x = 0.3 + 0.4 * torch.rand(32, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=g)
    want = _closed_form(model, x, y, 0.1)
    torch.testing.assert_close(fgsm(model, x, y, 0.1), want, rtol=0, atol=1e-15)
    for loss in ("cross_entropy", "margin"):
        torch.testing.assert_close(pgd(model, x, y, 0.1, steps=10, random_start=False, loss=loss), want,
                                   rtol=0, atol=1e-12)
        got = pgd(model, x, y, 0.1, steps=20, loss=loss, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # 2.5 eps of steps cross the ball


def test_attacks_clip_project_and_leave_the_model_alone():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 10))
    model.train()
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)
    for x_adv in (fgsm(model, x, y, 0.3), pgd(model, x, y, 0.3, steps=5, generator=g)):
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert model.training and all(p.grad is None for p in model.parameters())
    unclipped = fgsm(model, x, y, 0.3, clip=None)
    torch.testing.assert_close((unclipped - x).abs(), torch.full_like(x, 0.3))  # every pixel moves eps
    # eval mode inside the attack: dropout off, so FGSM is deterministic
    torch.testing.assert_close(fgsm(model, x, y, 0.3), fgsm(model, x, y, 0.3))


def test_bad_attack_settings_are_clear_errors():
    model, x, y = _linear(4, 3, 0), torch.rand(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0.*got -0.1"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        pgd(model, x, y, float("nan"))
    with pytest.raises(TypeError, match="eps must be a number"):
        fgsm(model, x, y, "0.1")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="loss must be"):
        fgsm(model, x, y, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="clip must be None or"):
        fgsm(model, x, y, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0.*got -0.05"):
        evaluate_transfer(model, {"t": model}, (x, y), eps=(0.1, -0.05))
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        evaluate_transfer(model, {"t": model}, (x, y), attacks=("fgsm", "cw"))
    with pytest.raises(ValueError, match="need labels"):
        evaluate_transfer(model, {"t": model}, x)
    with pytest.raises(ValueError, match="size must be >= 2"):
        train_diverse_family(lambda: None, None, size=1)


def _classifier(seed: int, x, y, hidden: int = 0, steps: int = 150) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else [nn.Linear(64, 10)]
    model = nn.Sequential(nn.Flatten(), *layers)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_transfer_evaluation_and_result(tmp_path):
    x, y = load_digits_tensors()
    train, test = slice(0, 1200), slice(1200, 1500)
    source, target = _classifier(0, x[train], y[train]), _classifier(1, x[train], y[train], hidden=32)
    data = TensorImageDataset(x[test], y[test])
    result = evaluate_transfer(source, {"other": target}, data, groups={"other": "independent"}, eps=(0.0, 0.1, 0.3),
                               pgd_steps=10, feature_layer="", batch_size=128)
    assert result.models == ("source", "other") and result.groups == ("source", "independent")
    assert result.attacks[0] == "clean" and result.accuracy.shape == (1, 2, 7)
    acc = result.accuracy[0]
    clean = [float((m(x[test]).argmax(1) == y[test]).float().mean()) for m in (source, target)]
    np.testing.assert_allclose(acc[:, 0], clean)
    np.testing.assert_allclose(acc[:, 1], clean)  # FGSM at eps 0 changes nothing
    np.testing.assert_allclose(acc[:, 4], clean)  # PGD at eps 0 either
    assert acc[0, 3] < 0.5 * acc[0, 0] and acc[0, 6] <= acc[0, 3] + 0.02  # white-box: large drop, PGD >= FGSM
    assert acc[0, 2] < acc[1, 2] < acc[1, 0]  # transfer hurts less than white-box
    assert result.dcor_to_source[0, 0] == pytest.approx(1.0, abs=1e-9) and 0 < result.dcor_to_source[0, 1] < 1

    stacked = TransferAttackResult.stack([result, evaluate_transfer(
        source, {"other": target}, data, groups={"other": "independent"}, eps=(0.0, 0.1, 0.3), pgd_steps=10,
        seed=1)])
    assert stacked.seeds == (0, 1) and stacked.accuracy.shape == (2, 2, 7)
    frame = stacked.to_frame()
    assert len(frame) == 2 * 2 * 7 and set(frame["group"]) == {"source", "independent"}
    assert "| independent | " in stacked.to_markdown() and "PGD eps=0.3" in stacked.to_markdown()
    loaded = TransferAttackResult.load(stacked.save(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.accuracy, stacked.accuracy)
    assert loaded.eps == stacked.eps

    from lightning_tda.reporting import Reporter

    stacked.log(Reporter(tmp_path / "report"), "transfer")
    assert (tmp_path / "report" / "figures" / "transfer.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "tables" / "transfer_summary.csv").exists()
    assert (tmp_path / "report" / "figures" / "transfer_pgd.png").exists()  # Reporter.log_line
    assert "transfer/independent/pgd_eps0.3" in (tmp_path / "report" / "metrics.csv").read_text()
