"""Where export writes: --overwrite replaces only an artrt package or an empty directory,
and every refusal is one line before any work (nothing deleted, nothing written)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from artrt.errors import InputError
from artrt.export.package_export import _move_into_place, check_output_dir, export_package
from artrt.runtime.cli import main
from artrt.runtime.package import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME


def _package(path: Path) -> Path:
    """A directory that looks like an artrt package (structure only; no graphs)."""
    path.mkdir(parents=True)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "components": {}, "experts": [], "files": []}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    (path / "graph.onnx").write_bytes(b"old")
    return path


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def _refused(out: Path, overwrite: bool, pattern: str) -> None:
    """``check_output_dir`` refuses with one line containing ``pattern`` and writes nothing."""
    before = sorted(out.parent.iterdir()) if out.parent.is_dir() else None
    with pytest.raises(InputError) as exc:
        check_output_dir(out, overwrite)
    message = str(exc.value)
    assert pattern in message and "\n" not in message, message
    if before is not None:
        assert sorted(out.parent.iterdir()) == before


def test_new_output_is_accepted_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("a/b/pkg", overwrite=False) == tmp_path / "a" / "b" / "pkg"
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_overwrite(tmp_path):
    _refused(_package(tmp_path / "pkg"), False, "already exists; pass --overwrite")


def test_overwrite_refuses_a_users_directory(tmp_path):
    out = _user_dir(tmp_path / "home")
    _refused(out, True, "neither an artrt package")
    assert (out / "thesis.txt").read_text() == "years of work"


@pytest.mark.parametrize("manifest", ["not json {", "[1, 2]", json.dumps({"format": FORMAT_NAME}),
                                      json.dumps({"format": "other", "components": {}, "experts": [], "files": []})])
def test_overwrite_refuses_a_directory_whose_artrt_json_is_not_a_manifest(tmp_path, manifest):
    out = _user_dir(tmp_path / "notes")
    (out / MANIFEST_NAME).write_text(manifest)
    _refused(out, True, "neither an artrt package")


def test_overwrite_accepts_a_package_or_an_empty_directory(tmp_path):
    package = _package(tmp_path / "pkg")
    assert check_output_dir(package, overwrite=True) == package
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", overwrite=True) == tmp_path / "empty"
    assert (package / "graph.onnx").exists()  # checking deletes nothing


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_file_is_refused(tmp_path, overwrite):
    out = tmp_path / "pkg"
    out.write_text("mine")
    _refused(out, overwrite, "is a file, not a package directory")
    assert out.read_text() == "mine"


def test_output_that_is_a_symlink_is_refused(tmp_path):
    target = _package(tmp_path / "pkg")
    (tmp_path / "link").symlink_to(target)
    _refused(tmp_path / "link", True, "symbolic link")


def test_parent_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    _refused(tmp_path / "file" / "sub" / "pkg", False, "is not a directory")


def test_parent_must_be_writable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))  # root too
    try:
        _refused(locked / "new" / "pkg", False, "not writable")
    finally:
        locked.chmod(0o700)


def test_partial_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "pkg.partial").write_text("someone else's file")
    _refused(tmp_path / "pkg", False, "pkg.partial")
    assert (tmp_path / "pkg.partial").read_text() == "someone else's file"


def test_old_that_is_a_users_directory_is_refused(tmp_path):
    _package(tmp_path / "pkg")
    _user_dir(tmp_path / "pkg.old")
    _refused(tmp_path / "pkg", True, "pkg.old")


@pytest.fixture()
def warnings(caplog, monkeypatch):
    """The warning lines artrt logs (the CLI stops the "artrt" logger propagating to caplog)."""
    monkeypatch.setattr(logging.getLogger("artrt"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="artrt")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


class _Stop(Exception):
    pass


class _StopSources:
    """Sources that stop the export as soon as it reads their models (after the output checks)."""

    family = "same-arch"  # read with the expert count for the family's defaults, before any work
    experts = ((), ())

    @property
    def text_encoders(self):
        raise _Stop


def test_leftover_partial_directory_is_removed_with_a_warning(tmp_path, warnings):
    partial = tmp_path / "pkg.partial"
    partial.mkdir()
    (partial / "text_encoder").mkdir()
    (partial / "text_encoder" / "model.onnx").write_bytes(b"half")
    with pytest.raises(_Stop):
        export_package(_StopSources(), tmp_path / "pkg", targets=("cpu",))
    assert [w for w in warnings() if str(partial) in w and "interrupted export" in w], warnings()
    assert not (partial / "text_encoder").exists()


def test_refusal_comes_before_any_export_work(tmp_path):
    out = _user_dir(tmp_path / "home")
    with pytest.raises(InputError, match="neither an artrt package"):
        export_package(_StopSources(), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_swap_replaces_the_old_package(tmp_path):
    out = _package(tmp_path / "pkg")
    work = _package(tmp_path / "pkg.partial")
    (work / "graph.onnx").write_bytes(b"new")
    _move_into_place(work, out, overwrite=True)
    assert (out / "graph.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_failed_swap_keeps_the_old_package(tmp_path):
    out = _package(tmp_path / "pkg")
    missing_work = tmp_path / "pkg.partial"  # renaming it fails
    with pytest.raises(InputError, match="cannot move the new package"):
        _move_into_place(missing_work, out, overwrite=True)
    assert (out / "graph.onnx").read_bytes() == b"old"
    assert not (tmp_path / "pkg.old").exists()


def test_swap_into_a_new_directory_after_an_interrupted_swap(tmp_path, warnings):
    _package(tmp_path / "pkg.old")  # a swap killed between its two renames
    work = _package(tmp_path / "pkg.partial")
    _move_into_place(work, tmp_path / "pkg", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert [w for w in warnings() if "pkg.old" in w], warnings()


def test_cli_overwrite_keeps_a_users_directory(capsys, models_dir, tmp_path):
    out = _user_dir(tmp_path / "home")
    code = main(["export", "--base", str(models_dir / "base"), "--detail-unet", str(models_dir / "detail_unet"),
                 "--out", str(out), "--overwrite", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert len(lines) == 1 and "neither an artrt package" in lines[0], err
    assert "Traceback" not in err
    assert (out / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
