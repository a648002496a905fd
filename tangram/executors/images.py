"""OCI images for the container executor: from the reference a user has to an unpacked
root filesystem, cached per manifest digest and shared read-only.

A reference names where the image is, in skopeo's transport syntax:

- ``oci:<layout-dir>:<tag>``: an OCI image layout on disk;
- ``docker-archive:<file.tar>``: the tarball ``docker save`` writes;
- ``containers-storage:<name>``: an image built locally with podman or buildah;
- ``docker://<registry>/<name>:<tag>``: an image in a registry.

``skopeo copy`` brings the image into one OCI layout of the store (blobs shared between
images), ``umoci unpack`` unpacks its manifest once into ``images/<digest>``: the root
filesystem every container of that image uses as the read-only lower layer of its
overlay, and umoci's ``config.json`` (a runtime spec with the image's Env, WorkingDir and
User), which the container executor starts its own configuration from.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram.executors.sandbox import SandboxError

TRANSPORTS = ("oci:", "docker-archive:", "containers-storage:", "docker://", "oci-archive:")
STORE_ENV = "TANGRAM_IMAGE_STORE"  # where ImageStore() keeps images when given no root
TOOL_TIMEOUT = 900.0  # seconds; a registry pull of a large image takes a while


@dataclass(frozen=True, slots=True)
class Image:
    """An unpacked image: ``rootfs`` must never be written (containers share it)."""

    ref: str
    digest: str  # of the manifest, "sha256:..."
    path: Path  # images/<digest>: rootfs/ and config.json

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def spec(self) -> dict[str, Any]:
        """umoci's runtime spec for the image (a fresh copy: callers change it)."""
        data: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        return data

    @property
    def env(self) -> list[str]:
        return list(self.spec.get("process", {}).get("env", []))


def default_store() -> Path:
    return Path(os.environ.get(STORE_ENV) or Path.home() / ".cache" / "tangram" / "images")


def tool_problem() -> str | None:
    """Which of the tools images need is missing here, or None."""
    missing = [t for t in ("skopeo", "umoci") if shutil.which(t) is None]
    if missing:
        return (
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
            f"(apt-get install {' '.join(missing)}; .ci/run does it); the container executor "
            "needs skopeo to fetch images and umoci to unpack them"
        )
    return None


class ImageStore:
    """Images unpacked under ``root`` (``$TANGRAM_IMAGE_STORE`` or
    ``~/.cache/tangram/images`` by default), one directory per manifest digest.

    ``get(ref)`` copies and unpacks on first use and is cheap afterwards; processes
    sharing a root take turns (a file lock), so an image is unpacked once."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root if root is not None else default_store()).resolve()
        self._known: dict[str, Image] = {}

    def get(self, ref: str) -> Image:
        """The unpacked image ``ref`` names (blocking: may copy and unpack); raises
        ``SandboxError`` for a bad reference or a missing tool."""
        name = check_ref(ref)
        if ref in self._known and self._known[ref].rootfs.is_dir():
            return self._known[ref]
        if (problem := tool_problem()) is not None:
            raise SandboxError(f"cannot use image {ref!r}: {problem}")
        self.root.mkdir(parents=True, exist_ok=True)
        layout = self.root / "layout"
        with self._locked():
            _tool(["skopeo", "copy", "--quiet", ref, f"oci:{layout}:{name}"], ref, "copy")
            digest = _digest_of(layout, name, ref)
            path = self.root / "images" / digest.replace(":", "_")
            if not (path / "rootfs").is_dir() or not (path / "config.json").is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=path.parent))
                try:
                    bundle = tmp / "b"
                    _tool(
                        ["umoci", "unpack", "--image", f"{layout}:{name}", str(bundle)],
                        ref,
                        "unpack",
                    )
                    shutil.rmtree(path, ignore_errors=True)  # a half-made one
                    bundle.rename(path)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        image = Image(ref, digest, path)
        self._known[ref] = image
        return image

    def images(self) -> list[str]:
        """The digests unpacked here."""
        d = self.root / "images"
        return sorted(p.name.replace("_", ":", 1) for p in d.iterdir()) if d.is_dir() else []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def check_ref(ref: str) -> str:
    """The tag ``ref`` gets in the store's layout (a digest of the reference, so distinct
    references never share one); ``SandboxError`` for what is not a reference."""
    if not isinstance(ref, str) or not ref.startswith(TRANSPORTS):
        raise SandboxError(
            f"bad image reference {ref!r}: give one of oci:<layout-dir>:<tag>, "
            "docker-archive:<file.tar>, containers-storage:<name> or docker://<name>:<tag>"
        )
    rest = ref.split("//", 1)[1] if ref.startswith("docker://") else ref.split(":", 1)[1]
    if not rest.strip():
        raise SandboxError(f"bad image reference {ref!r}: nothing after the transport")
    return "r" + hashlib.sha256(ref.encode()).hexdigest()[:32]


def _tool(argv: list[str], ref: str, what: str) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"cannot {what} image {ref!r}: {argv[0]} timed out") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[-2000:] or f"exit code {done.returncode}"
        raise SandboxError(f"cannot {what} image {ref!r}: {argv[0]} says: {why}")


def _digest_of(layout: Path, name: str, ref: str) -> str:
    """The manifest digest the layout's index tags ``name`` with."""
    index = json.loads((layout / "index.json").read_text())
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == name:
            return str(m["digest"])
    raise SandboxError(f"cannot copy image {ref!r}: skopeo left no manifest tagged {name}")
