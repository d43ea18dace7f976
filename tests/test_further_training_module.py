"""``FurtherTraining`` under a Lightning Trainer equals the function, and a fit killed at any step
and resumed from its Lightning checkpoint ends with the same scores."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
from conftest import trainer_kwargs
from test_further_training import tiny_problem

from lightning_tda.further_training import FurtherTraining, further_training_scores

KWARGS = dict(instances=[0, 4, 17, 29], steps=(2, 5, 9), seeds=(3, 11), lr=0.05, batch_size=8, momentum=0.9,
              weight_decay=1e-2, keep_per_seed=True)


def test_module_under_a_trainer_equals_the_function(tmp_path):
    model, train, test = tiny_problem()
    module = FurtherTraining(model, train, test, **KWARGS)
    assert module.total_steps == 18
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=module.total_steps)).fit(module)
    ours = module.result()
    reference = further_training_scores(model, train, test, progress=False, **KWARGS)
    np.testing.assert_allclose(ours.per_seed, reference.per_seed, atol=1e-12)
    np.testing.assert_allclose(ours.scores, reference.scores, atol=1e-12)
    assert ours.seeds == (3, 11)


@pytest.mark.parametrize("stop", [7, 9, 13])  # inside the first seed, at its end, inside the second
def test_a_resumed_fit_ends_with_the_same_scores(tmp_path, stop):
    model, train, test = tiny_problem()
    first = FurtherTraining(model, train, test, **KWARGS)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=stop))
    trainer.fit(first)
    ckpt = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    if stop >= 9:
        assert first.result().seeds == (3,)
    resumed = FurtherTraining(model, train, test, **KWARGS)
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=resumed.total_steps)).fit(resumed, ckpt_path=str(ckpt))
    reference = further_training_scores(model, train, test, progress=False, **KWARGS)
    np.testing.assert_allclose(resumed.result().per_seed, reference.per_seed, atol=1e-12)


def test_result_before_any_seed_finished_is_refused(tmp_path):
    model, train, test = tiny_problem()
    module = FurtherTraining(model, train, test, **KWARGS)
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=3)).fit(module)
    with pytest.raises(RuntimeError, match="no seed has finished"):
        module.result()
