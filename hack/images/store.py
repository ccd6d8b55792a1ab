"""Puts an image from buildah's overlay storage into the local node's image store, without
copying its files: ``bundle/rootfs`` is the image's layers applied in order as hard links to
the layers' own files (whiteouts and opaque directories honoured), ``oci/`` an OCI layout with
the image's index, manifest and config (what local/images.py reads: the manifest's digest is the
container's imageID; the layers stay in buildah's storage, listed in ``layers``).

    python3 store.py STORAGE_ROOT IMAGE_ID TAG DEST

hack/images/build.sh runs it under its lock, with buildah idle (its storage runs with
overlay.skip_mount_home, so the layers are on the store's mount; elsewhere each file is copied).
A hard link costs a directory entry: the trainer's 5 GB root filesystem takes seconds instead of
two full copies (an OCI layout of uncompressed layers, then umoci's unpack of them).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def layer_chain(root: Path, image_id: str) -> list[Path]:
    """The image's layers' diff directories in the storage, bottom first."""
    images = json.loads((root / "overlay-images" / "images.json").read_text())
    (image,) = [i for i in images if i["id"] == image_id]
    layers = {
        layer["id"]: layer
        for layer in json.loads((root / "overlay-layers" / "layers.json").read_text())
    }
    chain: list[Path] = []
    layer_id = image.get("layer")
    while layer_id:
        chain.append(root / "overlay" / layer_id / "diff")
        layer_id = layers[layer_id].get("parent")
    return chain[::-1]


def is_whiteout(path: Path, info: os.stat_result) -> bool:
    return (stat.S_ISCHR(info.st_mode) and info.st_rdev == 0) or path.name.startswith(
        WHITEOUT_PREFIX
    )


def is_opaque(directory: Path) -> bool:
    if (directory / OPAQUE_MARKER).exists():
        return True
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def same_metadata(source: Path, target: Path) -> None:
    info = os.lstat(source)
    os.chown(target, info.st_uid, info.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(target, stat.S_IMODE(info.st_mode))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def place(source: Path, target: Path, info: os.stat_result) -> None:
    """A hard link to ``source``; a copy where the two are on different mounts."""
    try:
        os.link(source, target, follow_symlinks=False)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISREG(info.st_mode):
        shutil.copy2(source, target)
    else:
        os.mknod(target, info.st_mode, info.st_rdev)
    same_metadata(source, target)


def apply_layer(diff: Path, rootfs: Path) -> None:
    """Lay ``diff`` (an overlay layer) over ``rootfs``, as hard links."""
    directories: list[tuple[Path, Path]] = []
    for current, dirnames, filenames in os.walk(diff):
        source_dir = Path(current)
        target_dir = rootfs / source_dir.relative_to(diff)
        if source_dir != diff:
            if target_dir.is_symlink() or (target_dir.exists() and not target_dir.is_dir()):
                target_dir.unlink()
            elif target_dir.is_dir() and is_opaque(source_dir):
                shutil.rmtree(target_dir)
            target_dir.mkdir(exist_ok=True)
            directories.append((source_dir, target_dir))
        # Links to directories are listed with the directories; they are entries like files.
        links = [d for d in dirnames if (source_dir / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in filenames + links:
            source, target = source_dir / name, target_dir / name
            info = os.lstat(source)
            if name == OPAQUE_MARKER:
                continue
            if is_whiteout(source, info):
                hidden = target_dir / name.removeprefix(WHITEOUT_PREFIX)
                if hidden.exists() or hidden.is_symlink():
                    remove(hidden)
                continue
            if target.exists() or target.is_symlink():
                remove(target)
            place(source, target, info)
    # Directories last, deepest first: adding their entries changed their times.
    for source_dir, target_dir in reversed(directories):
        same_metadata(source_dir, target_dir)


def blob(layout: Path, content: bytes) -> dict[str, object]:
    digest = hashlib.sha256(content).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(content)
    return {"digest": f"sha256:{digest}", "size": len(content)}


def write_layout(layout: Path, config: bytes, layers: list[dict[str, object]], tag: str) -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(layout, config)},
        "layers": layers,
    }
    described = blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **described,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def main(root: str, image_id: str, tag: str, dest: str) -> None:
    storage, target = Path(root), Path(dest)
    chain = layer_chain(storage, image_id)
    rootfs = target / "bundle" / "rootfs"
    rootfs.mkdir(parents=True)
    for diff in chain:
        apply_layer(diff, rootfs)
    # buildah keeps the image's manifest and config as the image's big data, by key.
    data = storage / "overlay-images" / image_id
    manifest = json.loads((data / "manifest").read_bytes())
    config_key = base64.b64encode(manifest["config"]["digest"].encode()).decode()
    config = (data / f"={config_key}").read_bytes()
    write_layout(target / "oci", config, manifest["layers"], tag)
    (target / "layers").write_text("".join(f"{diff}\n" for diff in chain))


if __name__ == "__main__":
    main(*sys.argv[1:])
