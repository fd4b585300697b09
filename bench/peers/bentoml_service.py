"""Peer of the serving benchmark: BentoML serving this project's network and weights with the seed's
preprocessing.

``POST /predict`` with the multipart field ``file`` (BentoML decodes it into a Pillow image); the answer is the
seed's JSON in a one-element list, since a batchable BentoML API takes and returns lists. Adaptive batching on
(``max_batch_size`` 16, ``max_latency_ms`` 1000), 2 worker processes, torch on one thread in each, request
timeout 30 s, no access log (as every server in the benchmark). Runs in ``bench/peers/.venv-bentoml`` (``bench/peers/requirements-bentoml.txt``) with the project
root on ``PYTHONPATH``.

    MODEL_DIR=model PYTHONPATH=. bench/peers/.venv-bentoml/bin/python -m bentoml serve \\
        bench.peers.bentoml_service:MNISTService --host 127.0.0.1 --port 8102
"""

from __future__ import annotations

from typing import Any

import bentoml
from PIL.Image import Image

from bench.peers.common import SeedStyleModel, model_dir


@bentoml.service(workers=2, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class MNISTService:
    """The model loaded once per worker process."""

    def __init__(self) -> None:
        self.model = SeedStyleModel(model_dir())

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=1000)
    def predict(self, file: list[Image]) -> list[dict[str, Any]]:
        """Seed transform per image, one forward pass per batch."""
        return self.model.predict([self.model.tensor(image) for image in file])
