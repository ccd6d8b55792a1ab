"""hack/images/store.py lays an image's overlay layers out as one root filesystem of hard links
(what the local node runs containers from): later layers win, whiteouts delete, opaque
directories hide what was below, and nothing is copied."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

STORE_PY = Path(__file__).resolve().parents[2] / "hack" / "images" / "store.py"


def load_store() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_store", STORE_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.mark.parametrize("mounts", ["one mount", "layers on another mount"])
def test_layers_become_one_root_of_hard_links_with_whiteouts_and_opaque_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounts: str
) -> None:
    store = load_store()
    if mounts != "one mount":

        def cross_device(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(store.os, "link", cross_device)
    lower, upper, rootfs = tmp_path / "lower", tmp_path / "upper", tmp_path / "rootfs"
    write(lower / "etc" / "passwd", "root\n")
    write(lower / "opt" / "app" / "old.py", "old\n")
    write(lower / "opt" / "app" / "gone.py", "gone\n")
    write(lower / "var" / "cache" / "a", "a\n")
    write(lower / "usr" / "bin" / "tool", "#!/bin/sh\n", 0o755)
    (lower / "usr" / "bin" / "alias").symlink_to("tool")
    write(upper / "etc" / "passwd", "root\nkubetune\n")
    write(upper / "opt" / "app" / "new.py", "new\n")
    os.mknod(upper / "opt" / "app" / "gone.py", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    write(upper / "usr" / "bin" / ".wh.alias", "")  # the other whiteout form
    write(upper / "var" / "cache" / ".wh..wh..opq", "")
    write(upper / "var" / "cache" / "b", "b\n")
    (upper / "var" / "cache").chmod(0o700)
    rootfs.mkdir()

    for layer in (lower, upper):
        store.apply_layer(layer, rootfs)

    assert (rootfs / "etc" / "passwd").read_text() == "root\nkubetune\n"
    assert sorted(p.name for p in (rootfs / "opt" / "app").iterdir()) == ["new.py", "old.py"]
    assert sorted(p.name for p in (rootfs / "var" / "cache").iterdir()) == ["b"]
    assert stat.S_IMODE((rootfs / "var" / "cache").stat().st_mode) == 0o700
    assert sorted(p.name for p in (rootfs / "usr" / "bin").iterdir()) == ["tool"]
    assert os.access(rootfs / "usr" / "bin" / "tool", os.X_OK)
    if mounts != "one mount":  # copied, with the layer's mode
        assert (rootfs / "usr" / "bin" / "tool").stat().st_ino != (
            lower / "usr" / "bin" / "tool"
        ).stat().st_ino
        return
    # Hard links to the layers' own files: no byte was copied.
    assert (rootfs / "opt" / "app" / "new.py").stat().st_ino == (
        upper / "opt" / "app" / "new.py"
    ).stat().st_ino
    assert (rootfs / "etc" / "passwd").stat().st_ino == (upper / "etc" / "passwd").stat().st_ino
