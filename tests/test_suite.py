"""The suite's own rules: every skip goes through ``require()`` (so CI turns it into a failure), the prerequisites
are obtained as documented.

Run: pytest tests/test_suite.py -q     (seconds; no Ray)
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import ROOT, download_pinned, kuberay_crds_dir, require

SKIP_CALLS = {"pytest.skip", "pytest.xfail", "pytest.importorskip", "unittest.skip", "unittest.skipIf"}
SKIP_CALLS |= {"unittest.skipUnless"}
SKIP_MARKS = {"pytest.mark.skip", "pytest.mark.skipif", "pytest.mark.xfail"}
SKIP_NAMES = {
    "skip",
    "skipIf",
    "skipUnless",
    "importorskip",
    "xfail",
    "SkipTest",
}  # from pytest/unittest import


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def direct_skips(source: str) -> list[str]:
    """Every way ``source`` skips (or expects a failure) without require(): pytest's and unittest's calls, marks,
    importorskip, ``SkipTest``; as ``line: code``. Code only: strings and comments never match."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pytest", "unittest"):
            found |= {f"{node.lineno}: {node.module}.{a.name}" for a in node.names if a.name in SKIP_NAMES}
            continue
        name = dotted(node.func) if isinstance(node, ast.Call) else dotted(node)
        called = isinstance(node, ast.Call) and (name in SKIP_CALLS or name.endswith(".skipTest"))
        if called or name in SKIP_MARKS or name.endswith("SkipTest"):
            found.add(f"{node.lineno}: {name}")
    return sorted(found)


def test_no_test_skips_without_require() -> None:
    """Only require() may skip: REQUIRE_PREREQUISITES=1 in CI turns its skips into failures."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        calls = direct_skips(path.read_text())
        if path.name == "conftest.py":
            (inside_require,) = calls  # the one call, inside require()
            lineno = int(inside_require.split(":")[0])
            assert require.__code__.co_firstlineno < lineno <= require.__code__.co_firstlineno + 12, calls
            continue
        if calls:
            found[str(path.relative_to(ROOT))] = calls
    assert found == {}, f"skip through tests.conftest.require(condition, reason, enable) instead: {found}"


@pytest.mark.parametrize(
    "line",
    [
        'pytest.skip("no kubectl")',
        "pytest.skip(reason='x', allow_module_level=True)",
        '@pytest.mark.skipif(sys.platform != "linux", reason="x")\ndef test_x(): pass',
        "@pytest.mark.skip\ndef test_x(): pass",
        "pytestmark = pytest.mark.xfail(strict=False)",
        'yaml = pytest.importorskip("yaml")',
        "from pytest import skip",
        "@unittest.skipIf(True, 'x')\ndef test_x(): pass",
        "raise unittest.SkipTest('x')",
        "self.skipTest('x')",
    ],
)
def test_the_check_catches_every_form(line: str) -> None:
    assert len(direct_skips(line)) == 1, direct_skips(line)


@pytest.mark.parametrize(
    "line",
    [
        "require(shutil.which('wrk') is not None, 'wrk')",
        "failed = issubclass(exc, pytest.skip.Exception)",
        "print('pytest.skip(x)')  # pytest.skip(y)",
    ],
)
def test_the_check_leaves_other_code_alone(line: str) -> None:
    assert direct_skips(line) == []


def test_require_skips_with_the_enabling_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUIRE_PREREQUISITES", raising=False)
    require(True, "never")
    with pytest.raises(
        pytest.skip.Exception, match=r"wrk is not installed \[enable: apt-get install -y wrk\]"
    ):
        require(False, "wrk is not installed", "apt-get install -y wrk")


def test_require_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUIRE_PREREQUISITES", "1")
    with pytest.raises(pytest.fail.Exception, match="missing prerequisite: wrk is not installed"):
        require(False, "wrk is not installed", "apt-get install -y wrk")


def test_mnist_folder_is_the_one_make_run_fills(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.delenv("MODEL_DIR", raising=False)
    assert conftest.mnist_folder() == ROOT / "model" / "data"  # make run's default --model-dir ./model
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert conftest.mnist_folder() == tmp_path / "data"
    monkeypatch.setenv("MNIST_DATA_DIR", "/elsewhere")
    assert conftest.mnist_folder() == Path("/elsewhere")


def test_download_is_used_only_with_the_pinned_sha256(tmp_path: Path) -> None:
    source = tmp_path / "crd.yaml"
    source.write_bytes(b"kind: CustomResourceDefinition\n")
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "crd.yaml"
    with pytest.raises(ValueError, match="sha256"):
        download_pinned(source.as_uri(), "0" * 64, dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    download_pinned(source.as_uri(), good, dest)
    assert dest.read_bytes() == source.read_bytes()


def test_kuberay_crds_match_the_pins() -> None:
    """The CRDs the schema tests use are KubeRay's v1.7.0 release, byte for byte (CI: KUBERAY_CRDS_DIR)."""
    crds = kuberay_crds_dir()
    for name, sha256 in conftest.KUBERAY_CRDS_SHA256.items():
        assert hashlib.sha256((crds / name).read_bytes()).hexdigest() == sha256, name
