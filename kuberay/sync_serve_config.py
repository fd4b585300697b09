"""Copy ray_app/serve_config.yaml into the RayService's serveConfigV2 (run by `make sync-serve-config`)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "kuberay" / "serving" / "ray-service.mnist.yaml"
CONFIG = ROOT / "ray_app" / "serve_config.yaml"


def main() -> None:
    """Replace the indented block under ``serveConfigV2: |`` with the config file's text."""
    block = "".join(f"    {line}" if line.strip() else "\n" for line in CONFIG.read_text().splitlines(True))
    pattern = r"(  serveConfigV2: \|\n)(?:(?:    .*)?\n)*?(?=  \S)"
    text, count = re.subn(pattern, lambda m: m.group(1) + block, MANIFEST.read_text(), count=1)
    if count != 1:
        raise SystemExit(f"no serveConfigV2 block found in {MANIFEST}")
    MANIFEST.write_text(text)


if __name__ == "__main__":
    main()
