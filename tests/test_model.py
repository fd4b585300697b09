"""The network's shapes and the artifact: round trip, atomic publishing, corrupt files, rollback."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ray_app import model as model_module
from ray_app.model import ArtifactError, ModelConfig, Net, load_artifact, rollback, save_artifact

META = {"config": asdict(ModelConfig()), "normalization": {"mean": 0.1307, "std": 0.3081}}


def _publish(model_dir: Path, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = Net().state_dict()
    return save_artifact(model_dir, state, META), state


def test_forward_shape() -> None:
    net = Net().eval()
    assert net(torch.randn(7, 1, 28, 28)).shape == (7, 10)
    assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_config_changes_shape() -> None:
    small, big = Net(conv1=8, conv2=16, hidden=32), Net()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(big)
    with pytest.raises(RuntimeError):
        big.load_state_dict(small.state_dict())


def test_round_trip_plain_torch_and_loader(tmp_path: Path) -> None:
    version, state = _publish(tmp_path, 0)
    plain = Net()
    plain.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))  # no Ray, no helper
    artifact = load_artifact(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert artifact.meta == meta
    assert meta["version"] == version and meta["architecture"] == "Net"
    assert meta["sha256"] == hashlib.sha256((tmp_path / "model.pth").read_bytes()).hexdigest()
    assert not artifact.model.training
    for key, value in state.items():
        assert torch.equal(artifact.model.state_dict()[key], value)
        assert torch.equal(plain.state_dict()[key], value)
    assert (tmp_path / "versions" / version / "model.pth").is_file()


def test_missing_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no model yet.*model.pth, model.json"):
        load_artifact(tmp_path)


def test_truncated_weights_rejected(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    weights = tmp_path / "model.pth"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    meta = json.loads((tmp_path / "model.json").read_text())
    # checksum matches, so the loader must parse and fail
    meta["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not a readable state_dict"):
        load_artifact(tmp_path)


def test_bad_checksum_rejected(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    (tmp_path / "model.pth").write_bytes(b"garbage")
    (tmp_path / "versions").rename(tmp_path / "moved")  # no complete copy to fall back on
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(tmp_path, retry_delay_s=0.01)


def test_wrong_shape_rejected(tmp_path: Path) -> None:
    small = Net(conv1=8, conv2=16, hidden=32).state_dict()
    save_artifact(tmp_path, small, META)  # metadata claims the default widths
    with pytest.raises(ArtifactError, match="does not fit Net"):
        load_artifact(tmp_path)


def test_bad_json_rejected(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path)


def test_crash_between_renames_leaves_a_usable_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_version, old_state = _publish(tmp_path, 0)
    real_replace = os.replace

    def crash_on_top_level_json(src: str, dst: str | Path) -> None:
        if Path(dst) == tmp_path / "model.json":
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_top_level_json)
    with pytest.raises(KeyboardInterrupt):
        _publish(tmp_path, 1)
    monkeypatch.setattr(os, "replace", real_replace)
    # model.pth is already the new file, model.json still the old one: the loader uses the old complete copy.
    artifact = load_artifact(tmp_path, retry_delay_s=0.01)
    assert artifact.meta["version"] == old_version
    assert torch.equal(artifact.model.state_dict()["head.4.weight"], old_state["head.4.weight"])
    assert "does not match" in artifact.warning and f"versions/{old_version}" in artifact.warning
    assert load_artifact(tmp_path / "versions" / old_version).warning is None
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_crash_while_writing_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_version, _ = _publish(tmp_path, 0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "model.pth", tmp_path / "model.json")}

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        _publish(tmp_path, 1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "model.pth", tmp_path / "model.json")} == before
    assert load_artifact(tmp_path).meta["version"] == old_version
    assert not list(tmp_path.rglob(".*.tmp"))


def test_versions_kept_and_rollback(tmp_path: Path) -> None:
    first, first_state = _publish(tmp_path, 0)
    second, _ = _publish(tmp_path, 1)
    assert first != second
    assert load_artifact(tmp_path).meta["version"] == second
    rollback(tmp_path, first)
    artifact = load_artifact(tmp_path)
    assert artifact.meta["version"] == first
    assert torch.equal(artifact.model.state_dict()["head.4.weight"], first_state["head.4.weight"])
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == sorted([first, second])


# ------------------------------------------------------------------------ file rules (hostile files)


def test_published_version_ids_have_the_checked_form(tmp_path: Path) -> None:
    version, _ = _publish(tmp_path, 0)
    assert model_module.VERSION_ID.fullmatch(version)
    assert model_module.check_version_id(version) == version


@pytest.mark.parametrize(
    "version", ["../../x", "..", "a/b", "/etc", "20260101-120000-0123abcd/..", "", "20260101-120000", None]
)
def test_rollback_refuses_anything_but_a_version_id(tmp_path: Path, version: object) -> None:
    _publish(tmp_path, 0)
    outside = tmp_path / "outside"  # a valid model outside versions/ that a path could reach
    _publish(outside, 1)
    before = (tmp_path / "model.json").read_bytes()
    with pytest.raises(ArtifactError, match="invalid model version"):
        rollback(tmp_path, version)  # type: ignore[arg-type]
    assert (tmp_path / "model.json").read_bytes() == before


def test_rollback_to_a_missing_version_says_so(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    with pytest.raises(ArtifactError, match="no version 20200101-000000-0123abcd"):
        rollback(tmp_path, "20200101-000000-0123abcd")


def test_loader_fallback_ignores_a_path_in_model_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _publish(tmp_path / "evil", 1)  # tmp_path/evil/model.pth: what "../../evil" would reach
    _publish(model_dir, 0)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["version"] = "../../evil"
    (model_dir / "model.json").write_text(json.dumps(meta))
    (model_dir / "model.pth").write_bytes(b"garbage")  # checksum mismatch: the loader looks for a copy
    with pytest.raises(ArtifactError, match="no intact copy.*invalid model version '../../evil'"):
        load_artifact(model_dir, retries=1, retry_delay_s=0.01)


@pytest.mark.parametrize(
    "change",
    [{"conv1": 100_000}, {"hidden": 0}, {"conv2": -3}, {"conv1": True}, {"hidden": "128"}, {"dropout": 1.5}],
)
def test_model_json_widths_are_bounded(tmp_path: Path, change: dict[str, object]) -> None:
    _publish(tmp_path, 0)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["config"] = {**meta["config"], **change}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=f"bad model config: {next(iter(change))}="):
        load_artifact(tmp_path)


def test_model_json_config_must_be_an_object(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["config"] = [1, 2]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="model config must be an object"):
        load_artifact(tmp_path)


def test_oversized_weights_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _publish(tmp_path, 0)
    weights = tmp_path / "model.pth"
    with open(weights, "r+b") as f:  # sparse: no disk space, but a stat size above the cap
        f.truncate(model_module.MAX_WEIGHTS_BYTES + 1)
    reads: list[int] = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(1) or real_read_bytes(self))
    with pytest.raises(ArtifactError, match=f"model.pth is {model_module.MAX_WEIGHTS_BYTES + 1} bytes"):
        load_artifact(tmp_path, retries=0)
    assert reads == []


def test_oversized_model_json_refused(tmp_path: Path) -> None:
    _publish(tmp_path, 0)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["padding"] = "x" * model_module.MAX_METADATA_BYTES
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="model.json is .* bytes, more than"):
        load_artifact(tmp_path)


def test_published_files_are_world_readable(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # even under a strict umask: serving may run under another uid
    try:
        first, _ = _publish(tmp_path, 0)
        _publish(tmp_path, 1)
        rollback(tmp_path, first)
    finally:
        os.umask(old_umask)
    files = [tmp_path / "model.pth", tmp_path / "model.json", *(tmp_path / "versions").glob("*/model.*")]
    assert len(files) == 6
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}


def test_cli_lists_and_rolls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, _ = _publish(tmp_path, 0)
    second, _ = _publish(tmp_path, 1)
    with caplog.at_level("INFO", logger="ray_app.model"):
        assert model_module.main(["--model-dir", str(tmp_path), "list"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert [line[: 2 + len(first)] for line in lines] == [f"  {first}", f"* {second}"]  # * = current
    assert model_module.main(["--model-dir", str(tmp_path), "rollback", first]) == 0
    assert load_artifact(tmp_path).meta["version"] == first
    caplog.clear()
    assert model_module.main(["--model-dir", str(tmp_path), "rollback", "../x"]) == 1
    assert "invalid model version" in caplog.text
    assert load_artifact(tmp_path).meta["version"] == first


def test_cli_help_states_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODEL_DIR", raising=False)
    with pytest.raises(SystemExit):
        model_module.main(["--help"])
    assert "(default: /mnt/model)" in " ".join(capsys.readouterr().out.split())
