"""Baseline for the serving benchmark: the seed's inference server, reproduced.

One uvicorn process with FastAPI, one image per request (``POST /predict``, multipart field ``file``), the seed's
transform (``Resize((28, 28))`` + ``ToTensor`` + ``Normalize``) with the constants from ``model.json``, and the
same weights and network class, loaded through ``ray_app.model.load_artifact``. Torch keeps its default thread
count, as the seed did (``--threads`` sets it). The access log is off (``--access-log`` turns it on), which only
favours the baseline.

    MODEL_DIR=model python bench/seed_server.py --port 8100
    curl -s -X POST -F "file=@samples/zero.png" http://localhost:8100/predict
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Annotated, Any

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from ray_app.model import DEFAULT_MODEL_DIR, load_artifact


def build_app(model_dir: str | Path) -> FastAPI:
    """The seed-style FastAPI app serving the model in ``model_dir``."""
    artifact = load_artifact(model_dir)
    norm = artifact.meta["normalization"]
    transform = transforms.Compose(
        [
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((norm["mean"],), (norm["std"],)),
        ]
    )
    model, version = artifact.model, str(artifact.meta["version"])
    app = FastAPI(title="MNIST classifier (seed-style baseline)")

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        """Classify one uploaded image."""
        image = Image.open(io.BytesIO(await file.read())).convert("L")
        with torch.no_grad():
            probs = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
        return {"prediction": int(probs.argmax()), "probs": probs.tolist(), "model_version": version}

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the baseline until interrupted."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR), help="env MODEL_DIR"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--access-log", action="store_true", help="log every request, as uvicorn does by default")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as the seed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(
        build_app(args.model_dir),
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
