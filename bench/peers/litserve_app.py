"""Peer of the serving benchmark: LitServe serving this project's network and weights with the seed's preprocessing.

``POST /predict`` with the multipart field ``file`` answers as the seed did. Dynamic batching on (``LitAPI``
``max_batch_size`` 16, ``batch_timeout`` 5 ms: with 0 LitServe's worker polls its queue without pause and keeps a
core busy), 2 inference worker processes, 2 HTTP server processes (LitServe's default: one per worker), ZeroMQ
between them (``fast_queue``, LitServe's advice above 100 req/s), torch on one thread in each worker, logs at warning
level. Of batch timeouts 1, 2 and 5 ms with and without ``fast_queue``, this served most at concurrency 16 and 64
(6 s runs on the 2-core machine: 566 and 780 req/s; 2 ms without ZeroMQ 511 and 645). Runs in
``bench/peers/.venv-litserve`` (``bench/peers/requirements-litserve.txt``) with the project root on ``PYTHONPATH``.

    MODEL_DIR=model PYTHONPATH=. bench/peers/.venv-litserve/bin/python bench/peers/litserve_app.py --port 8101
"""

import argparse
from typing import Any

import litserve as ls
import torch
from fastapi import Request

from bench.peers.common import SeedStyleModel, model_dir


class MNISTAPI(ls.LitAPI):
    """Decode (seed transform) per request, one forward pass per batch."""

    def setup(self, device: str) -> None:
        """Load the model once per inference worker."""
        self.model = SeedStyleModel(model_dir())

    def decode_request(self, request: Request) -> torch.Tensor:
        """The multipart form's ``file`` as a normalised tensor (annotated ``Request``: LitServe then passes the
        parsed form)."""
        return self.model.tensor(request["file"].file.read())

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep the list: ``predict`` stacks it."""
        return inputs

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """One forward pass for the batch."""
        return self.model.predict(images)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per request."""
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The seed's JSON answer."""
        return output


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--workers", type=int, default=2, help="inference worker processes")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    p.add_argument(
        "--fast-queue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ZeroMQ between the API servers and the workers (LitServe's advice above 100 req/s)",
    )
    args = p.parse_args(argv)
    api = MNISTAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=args.workers, fast_queue=args.fast_queue
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
