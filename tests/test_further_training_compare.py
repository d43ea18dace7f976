"""compare(): cosine and Spearman agreement per test example against references, its result's
table/plot/log/save, bad input, and the fast demo check end to end."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from test_further_training import tiny_problem

from lightning_tda.further_training import ComparisonResult, compare, further_training_scores
from lightning_tda.further_training.compare import row_cosine, row_spearman
from lightning_tda.reporting import Reporter


@pytest.fixture(scope="module")
def gold():
    model, train, test = tiny_problem()
    return further_training_scores(model, train, test, [0, 3, 5, 8, 13, 21], (4, 8, 12), seeds=2, lr=0.05,
                                   batch_size=8, progress=False)


def test_row_statistics_match_numpy_and_scipy():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(5, 9)), g.normal(size=(5, 9))
    b[1, :4] = b[1, 0]  # ties
    for r in range(5):
        assert row_cosine(a, b)[r] == pytest.approx(a[r] @ b[r] / np.linalg.norm(a[r]) / np.linalg.norm(b[r]))
        assert row_spearman(a, b)[r] == pytest.approx(spearmanr(a[r], b[r]).statistic)
    a[2] = 0.0
    assert np.isnan(row_cosine(a, b)[2]) and np.isnan(row_spearman(a, b)[2])


def test_a_positive_rescaling_agrees_and_a_flipped_sign_disagrees(gold):
    scale = np.linspace(0.5, 3.0, gold.n_test)[:, None]  # one positive factor per test example
    noise = np.random.default_rng(1).normal(size=gold.scores.shape[1:])
    result = compare(gold, {"exact": gold.scores[-1] * scale, "flipped": -gold.scores[-1], "noise": noise})
    cos, cos_sem = result.statistic("cosine")
    sp, _ = result.statistic("spearman")
    assert cos[0, -1] == pytest.approx(1.0) and sp[0, -1] == pytest.approx(1.0)
    assert cos[1, -1] == pytest.approx(-1.0) and sp[1, -1] == pytest.approx(-1.0)
    assert cos[0, 0] < 1.0  # the last K's scores are not the first K's
    expected = np.array([row_cosine(gold.scores[k].astype(float), noise) for k in range(3)])
    np.testing.assert_allclose(cos[2], expected.mean(1))
    np.testing.assert_allclose(cos_sem[2], expected.std(1, ddof=1) / np.sqrt(gold.n_test))
    assert result.labels == ("exact", "flipped", "noise")


def test_scores_over_the_whole_training_set_are_reduced_to_the_instances(gold):
    wide = np.zeros((gold.n_test, gold.n_train))
    wide[:, gold.instances] = gold.scores[-1]
    np.testing.assert_allclose(compare(gold, {"wide": wide}).cosine, compare(gold, {"narrow": gold.scores[-1]}).cosine)


def test_bad_method_scores_are_refused(gold):
    with pytest.raises(ValueError, match="no methods"):
        compare(gold, {})
    with pytest.raises(ValueError, match=r"shape \(7, 5\).*n_test=7, len\(instances\)=6"):
        compare(gold, {"short": np.zeros((7, 5))})
    bad = gold.scores[-1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        compare(gold, {"nan": bad})


def test_result_table_plot_log_and_save(gold, tmp_path):
    result = compare(gold, {"grad_dot": gold.scores[0], "datainf:1": gold.scores[1]})
    frame = result.to_frame()
    assert len(frame) == 6 and {"cosine", "cosine_sem", "spearman", "spearman_sem", "epoch", "n_test"} <= set(frame)
    assert list(frame["label"].unique()) == ["Grad-Dot", "DataInf (damping 1x)"]
    summary = result.summary()
    assert summary["grad_dot/cosine_first_K"] == pytest.approx(1.0)
    fig, ax = result.plot(metric="spearman", epochs=False)
    assert ax.get_xlabel() == "further-training steps K" and len(ax.get_legend().get_texts()) == 2
    reporter = Reporter(tmp_path / "report")
    result.log(reporter, "further_training")
    assert (tmp_path / "report" / "figures" / "further_training.png").exists()
    assert (tmp_path / "report" / "figures" / "further_training_spearman.png").exists()
    loaded = ComparisonResult.load(result.save(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.cosine, result.cosine)
    assert loaded.methods == result.methods and loaded.steps == result.steps


def test_the_fast_digits_check_runs_end_to_end():
    from lightning_tda.further_training import further_training_check

    result = further_training_check(fast=True, num_instances=8, num_test=12, seeds=2, epochs=(1, 2),
                                    methods=("grad_dot", "datainf:1"))
    cos, _ = result.statistic("cosine")
    assert cos.shape == (2, 2) and np.isfinite(cos).all()
    assert (cos[0] > 0.3).all()  # Grad-Dot agrees with further training at small K on digits


def test_the_example_runs_on_breast_cancer(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "further_training.py"
    spec = importlib.util.spec_from_file_location("further_training_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--fast", "--dataset", "breast_cancer", "--out", str(tmp_path / "bc")])
    assert summary["n_train"] == 455 and summary["n_test"] == 16 and summary["seeds"] == 2
    assert (tmp_path / "bc" / "report" / "figures" / "further_training.png").exists()
    assert (tmp_path / "bc" / "cosine.md").read_text().startswith("| method |")
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--epochs", "0", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()
