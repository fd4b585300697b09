"""What every peer server of the serving benchmark shares: this project's network and weights, and the seed's
preprocessing, so the servers differ only in how they serve.

The model comes from ``MODEL_DIR`` through ``ray_app.model.load_artifact`` (the project's own loader, which needs
only torch; the peers' virtualenvs get the project root on ``PYTHONPATH``). An upload is decoded with Pillow,
converted to grayscale and resized to 28 × 28 with torchvision's ``Resize`` + ``ToTensor`` + ``Normalize``, the
normalisation constants from ``model.json``: exactly ``bench/seed_server.py``'s transform. Torch gets one thread
per worker process (``TORCH_THREADS``, default 1). With ``PEER_PID_DIR`` set, each process that loads the model
leaves a file named after its PID there, so the benchmark knows which processes are the workers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms

from ray_app.model import load_artifact


class SeedStyleModel:
    """The project's network with the seed's transform: bytes of an image in, one answer per image out."""

    def __init__(self, model_dir: str) -> None:
        torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
        artifact = load_artifact(model_dir)
        norm = artifact.meta["normalization"]
        self.transform = transforms.Compose(
            [
                transforms.Resize((28, 28)),
                transforms.ToTensor(),
                transforms.Normalize((norm["mean"],), (norm["std"],)),
            ]
        )
        self.model, self.version = artifact.model, str(artifact.meta["version"])
        if os.environ.get("PEER_PID_DIR"):  # the benchmark reads each model-holding process's memory
            Path(os.environ["PEER_PID_DIR"], str(os.getpid())).touch()

    def tensor(self, upload: bytes | Image.Image) -> torch.Tensor:
        """One upload (its bytes, or the image a server decoded) as a normalised (1, 28, 28) tensor."""
        image = Image.open(io.BytesIO(upload)) if isinstance(upload, bytes) else upload
        return self.transform(image.convert("L"))

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """One forward pass over the stacked images; the seed's answer for each."""
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.stack(images)), dim=1)
        return [
            {"prediction": int(p.argmax()), "probs": p.tolist(), "model_version": self.version} for p in probs
        ]


def model_dir() -> str:
    """The model folder the benchmark passes in ``MODEL_DIR``."""
    return os.environ["MODEL_DIR"]
