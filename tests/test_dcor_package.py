"""The lightning_tda.dcor package: every public name importable from it, light to import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_tda.dcor as package


def test_public_names_importable_from_the_package():
    from lightning_tda.dcor import (  # noqa: F401  (what other engineers import)
        DistanceCorrelation,
        DistanceCorrelationLoss,
        DistanceCorrelationPenalty,
        PartialDistanceCorrelation,
        distance_correlation,
        linear_warmup,
        partial_distance_correlation,
        semi_partial_distance_correlation,
        u_distance_correlation_sqr,
    )
    from lightning_tda.dcor.metric import DistanceCorrelation as metric_class
    from lightning_tda.dcor.penalty import DistanceCorrelationPenalty as penalty_class

    assert DistanceCorrelation is metric_class and DistanceCorrelationPenalty is penalty_class
    for name in package.__all__:
        assert hasattr(package, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        package.nothing_here  # noqa: B018


def test_functional_names_import_without_lightning():
    # `from lightning_tda.dcor import distance_correlation` must not pull Lightning or torchmetrics
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'torchmetrics', 'pytorch_lightning', 'sklearn', 'scipy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from lightning_tda.dcor import distance_correlation, partial_distance_correlation\n"
        "print(float(distance_correlation(torch.eye(5), torch.eye(5))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(1.0)
