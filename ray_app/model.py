"""The CNN and its on-disk artifact: ``model.pth`` (a plain state_dict) + ``model.json`` (its metadata)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ARCHITECTURE = "Net"
DEFAULT_MODEL_DIR = "/mnt/model"
WEIGHTS = "model.pth"
METADATA = "model.json"
VERSIONS = "versions"
# A version id as save_artifact writes it (UTC time to the microsecond, then the first 8 hex digits of the weights'
# sha256), so two publishes of the same weights get distinct ids; ids without the microseconds (older models) are
# valid too. Only such ids are looked up under versions/: never a path.
VERSION_ID = re.compile(r"\d{8}-\d{6}(?:-\d{6})?-[0-9a-f]{8}")
MAX_WIDTH = 1024  # conv1, conv2 and hidden in model.json (the default model uses 32, 64, 128)
MAX_WEIGHTS_BYTES = 64 * 1024 * 1024  # model.pth (the default model is under 1 MiB)
MAX_METADATA_BYTES = 64 * 1024  # model.json
PUBLISHED_MODE = 0o644  # readable by serving pods that run under another uid than training


@dataclass(frozen=True)
class ModelConfig:
    """Widths of the network; saved in ``model.json`` so a loader rebuilds the same shape."""

    conv1: int = 32
    conv2: int = 64
    hidden: int = 128
    dropout: float = 0.25


class Net(nn.Module):
    """Two conv blocks (conv-pool-BN-ReLU) and a two-layer head: 28×28 normalised digit → 10 logits."""

    def __init__(self, conv1: int = 32, conv2: int = 64, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, conv1, 5, bias=False),  # 28 -> 24
            nn.MaxPool2d(2),  # -> 12; pooling first leaves BN and ReLU a quarter of the elements to work on
            nn.BatchNorm2d(conv1),
            nn.ReLU(inplace=True),
            nn.Conv2d(conv1, conv2, 3, bias=False),  # -> 10
            nn.MaxPool2d(2),  # -> 5
            nn.BatchNorm2d(conv2),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(conv2 * 5 * 5, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, 10) for normalised input of shape (N, 1, 28, 28)."""
        return self.head(self.features(x))


class ArtifactError(Exception):
    """The model directory holds no usable model; the message says why."""


def check_version_id(version: object) -> str:
    """``version`` if it has the form save_artifact writes (e.g. ``20260101-120000-123456-0123abcd``), else raise
    :class:`ArtifactError`: ids name a folder under ``versions/``, so ``..``, slashes and absolute paths never
    reach the filesystem."""
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version):
        raise ArtifactError(
            f"invalid model version {version!r}: expected YYYYMMDD-HHMMSS-<microseconds>-<8 hex digits>, "
            "as listed by `python -m ray_app.model list`"
        )
    return version


def check_config(config: object) -> ModelConfig:
    """The ``config`` of model.json as a :class:`ModelConfig`, widths bounded so a crafted file cannot ask
    for a huge network; raise :class:`ArtifactError` otherwise."""
    if not isinstance(config, dict):
        raise ArtifactError(f"model config must be an object, got {type(config).__name__}")
    try:
        parsed = ModelConfig(**config)
    except TypeError as exc:
        raise ArtifactError(f"bad model config: {exc}") from None
    for name in ("conv1", "conv2", "hidden"):
        value = getattr(parsed, name)
        if type(value) is not int or not 1 <= value <= MAX_WIDTH:
            raise ArtifactError(f"bad model config: {name}={value!r} is not an integer in 1..{MAX_WIDTH}")
    if type(parsed.dropout) not in (int, float) or not 0 <= parsed.dropout < 1:
        raise ArtifactError(f"bad model config: dropout={parsed.dropout!r} is not in [0, 1)")
    return parsed


@dataclass
class Artifact:
    """A loaded, validated model in eval mode plus its metadata (and what is wrong on disk, if anything)."""

    model: Net
    meta: dict[str, Any]
    warning: str | None = None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old or the new file, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, PUBLISHED_MODE)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_artifact(model_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Publish a model: keep a copy under ``versions/<id>/``, then swap ``model.pth`` and, last, ``model.json``.

    ``meta`` gets ``version``, ``architecture`` and ``sha256`` filled in. Returns the version id.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = _serialize(state_dict)
    sha = hashlib.sha256(buffer).hexdigest()
    version = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f") + "-" + sha[:8]
    meta = {**meta, "version": version, "architecture": ARCHITECTURE, "sha256": sha}
    text = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()

    version_dir = model_dir / VERSIONS / version
    version_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(version_dir / WEIGHTS, buffer)
    _write_atomic(version_dir / METADATA, text)
    _write_atomic(model_dir / WEIGHTS, buffer)
    _write_atomic(model_dir / METADATA, text)
    log.info("published model %s to %s", version, model_dir)
    return version


def rollback(model_dir: str | Path, version: str) -> None:
    """Make an earlier version under ``versions/`` the current model again (validated first).

    Raises :class:`ArtifactError` for an id that is not a version id or not a valid stored model.
    """
    source = Path(model_dir) / VERSIONS / check_version_id(version)
    if not source.is_dir():
        raise ArtifactError(f"no version {version} in {Path(model_dir) / VERSIONS}")
    load_artifact(source)
    _write_atomic(Path(model_dir) / WEIGHTS, (source / WEIGHTS).read_bytes())
    _write_atomic(Path(model_dir) / METADATA, (source / METADATA).read_bytes())
    log.info("rolled back %s to %s", model_dir, version)


def _serialize(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Serialise a state_dict with ``torch.save`` into bytes."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def files_signature(model_dir: str | Path) -> tuple[int, ...] | None:
    """Cheap "did the model change" check for the pair ``load_artifact`` reads: inode, mtime and size of
    ``model.json`` and ``model.pth`` (None while either is missing)."""
    model_dir = Path(model_dir)
    try:
        meta, weights = os.stat(model_dir / METADATA), os.stat(model_dir / WEIGHTS)
    except OSError:
        return None
    return (meta.st_ino, meta.st_mtime_ns, meta.st_size, weights.st_ino, weights.st_mtime_ns, weights.st_size)


def load_artifact(model_dir: str | Path, retries: int = 3, retry_delay_s: float = 0.2) -> Artifact:
    """Load and validate ``model.pth`` + ``model.json``; raise :class:`ArtifactError` saying what is wrong.

    A checksum mismatch is retried, since a writer may be between its two renames; if it persists (a writer
    died there), the complete copy under ``versions/<version>/`` that ``model.json`` names is used instead.
    """
    model_dir = Path(model_dir)
    for _ in range(retries):
        try:
            return _load_once(model_dir / WEIGHTS, model_dir / METADATA)
        except _ChecksumMismatch:
            time.sleep(retry_delay_s)
    try:
        return _load_once(model_dir / WEIGHTS, model_dir / METADATA)
    except _ChecksumMismatch as exc:
        version = _read_metadata(model_dir / METADATA).get("version")
        try:
            version_dir = model_dir / VERSIONS / check_version_id(version)
        except ArtifactError as bad:
            raise ArtifactError(f"{exc}; no intact copy to fall back on: {bad}") from None
        if not (version_dir / WEIGHTS).is_file():
            raise ArtifactError(str(exc)) from None
        artifact = _load_once(version_dir / WEIGHTS, model_dir / METADATA)
        artifact.warning = f"{exc}; using the intact copy in {version_dir}"
        log.warning("%s", artifact.warning)
        return artifact


class _ChecksumMismatch(ArtifactError):
    """``model.pth`` does not match the sha256 recorded in ``model.json``."""


def _load_once(weights: Path, metadata: Path) -> Artifact:
    """One attempt at reading and validating a weights file against its metadata."""
    if not metadata.is_file() or not weights.is_file():
        missing = ", ".join(p.name for p in (weights, metadata) if not p.is_file())
        raise ArtifactError(f"no model yet in {metadata.parent}: missing {missing}")
    meta = _read_metadata(metadata)
    if meta.get("architecture") != ARCHITECTURE:
        raise ArtifactError(f"{metadata}: architecture is not {ARCHITECTURE!r}")
    try:
        config = check_config(meta.get("config", {}))
    except ArtifactError as exc:
        raise ArtifactError(f"{metadata}: {exc}") from None
    data = _read_capped(weights, MAX_WEIGHTS_BYTES)
    sha = hashlib.sha256(data).hexdigest()
    if sha != meta.get("sha256"):
        raise _ChecksumMismatch(
            f"{weights} (sha256 {sha[:12]}…) does not match {metadata} (sha256 {str(meta.get('sha256'))[:12]}…)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ArtifactError(f"{weights} is not a readable state_dict: {exc}") from None
    model = Net(**asdict(config))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{weights} does not fit {ARCHITECTURE}{asdict(config)}: {exc}") from None
    return Artifact(model=model.eval(), meta=meta)


def _read_capped(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refused with :class:`ArtifactError` if it is larger than ``limit``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ArtifactError(f"{path} is {size} bytes, more than the {limit} allowed")
            data = f.read(limit + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if len(data) > limit:  # grew while being read
        raise ArtifactError(f"{path} is more than the {limit} bytes allowed")
    return data


def _read_metadata(path: Path) -> dict[str, Any]:
    """``model.json`` parsed (size capped); raise :class:`ArtifactError` unless it is a JSON object."""
    try:
        meta = json.loads(_read_capped(path, MAX_METADATA_BYTES))
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    return meta


def list_versions(model_dir: str | Path) -> list[dict[str, Any]]:
    """Metadata of every stored version under ``versions/``, oldest first (unreadable ones with ``error``)."""
    root = Path(model_dir) / VERSIONS
    found = []
    for path in sorted(root.iterdir() if root.is_dir() else []):
        if not VERSION_ID.fullmatch(path.name):
            continue
        try:
            found.append({**_read_metadata(path / METADATA), "version": path.name})
        except ArtifactError as exc:
            found.append({"version": path.name, "error": str(exc)})
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_app.model {list,rollback}``: show the stored versions, or make one current again."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.model",
        description="Stored model versions: list them, or roll the served model back to one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
        help="model folder (holds model.pth, model.json and versions/); env MODEL_DIR",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the stored versions, oldest first; * marks the current one")
    back = commands.add_parser("rollback", help="make a stored version the current model")
    back.add_argument("version", help="a version id from `list`, e.g. 20260101-120000-123456-0123abcd")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "rollback":
            rollback(args.model_dir, args.version)
            return 0
        metadata = Path(args.model_dir) / METADATA
        current = _read_metadata(metadata).get("version") if metadata.is_file() else None
        for meta in list_versions(args.model_dir):
            mark = "*" if meta["version"] == current else " "
            detail = meta.get("error") or f"test_accuracy={meta.get('test_accuracy', '?')}"
            log.info("%s %s  %s", mark, meta["version"], detail)
    except ArtifactError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
