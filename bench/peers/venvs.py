"""The peers' virtualenvs: ``bench/peers/.venv-<name>`` with ``requirements-<name>.txt`` installed.

LitServe and BentoML pin their own FastAPI/Starlette/uvicorn ranges, so each lives in a virtualenv of its own
beside this project's ``.venv`` (Ray's pins). A virtualenv is made on first use and remade when its requirements
file changes (the file's sha256 is kept in the virtualenv). Creating one takes a few minutes (torch's wheels).

    python -m bench.peers.venvs litserve bentoml      # create or update, print each one's python
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parent
STAMP = ".requirements.sha256"


def requirements(name: str) -> Path:
    """The pinned requirements of peer ``name``."""
    return PEERS / f"requirements-{name}.txt"


def venv_dir(name: str) -> Path:
    """Where peer ``name``'s virtualenv lives."""
    return PEERS / f".venv-{name}"


def python(name: str) -> Path:
    """The interpreter of peer ``name``'s virtualenv."""
    return venv_dir(name) / "bin" / "python"


def up_to_date(name: str) -> bool:
    """True when the virtualenv exists and was installed from the current requirements file."""
    stamp = venv_dir(name) / STAMP
    digest = hashlib.sha256(requirements(name).read_bytes()).hexdigest()
    return python(name).exists() and stamp.is_file() and stamp.read_text().strip() == digest


def ensure(name: str) -> Path:
    """Create (or remake) peer ``name``'s virtualenv if it is missing or stale; return its python."""
    if up_to_date(name):
        return python(name)
    folder = venv_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements(name))], check=True)
    (folder / STAMP).write_text(hashlib.sha256(requirements(name).read_bytes()).hexdigest() + "\n")
    return python(name)


if __name__ == "__main__":
    for peer in sys.argv[1:]:
        print(ensure(peer))
