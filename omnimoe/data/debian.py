"""Data that ships as a Debian package: fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into
a cache folder, once (nothing is installed, no root needed, no dependency pulled in)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from filelock import FileLock

from omnimoe.io import cache_dir


def fetch_deb(package: str, name: str, cache: str | Path | None = None) -> Path:
    """``package`` downloaded and unpacked under ``<cache>/<name>/unpacked`` (the root of its files); reused
    when an earlier call finished. Raises RuntimeError naming what failed (no apt-get, the download)."""
    root = Path(cache or cache_dir()) / name
    unpacked = root / "unpacked"
    if (unpacked / ".complete").is_file():
        return unpacked
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # one process fetches; the others wait, then find it done
        return _fetch(package, root, unpacked)


def _fetch(package: str, root: Path, unpacked: Path) -> Path:
    if (unpacked / ".complete").is_file():
        return unpacked
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"fetching {package} needs {tool} (a Debian/Ubuntu machine); or pass a cache holding it")
    debs = sorted(root.glob(f"{package}_*.deb"))
    if not debs:
        got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
        if got.returncode != 0:  # stale package lists: refresh once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
        if got.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {got.stderr.strip()[-500:]}")
        debs = sorted(root.glob(f"{package}_*.deb"))
    tmp = root / "unpacked.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(["dpkg", "-x", str(debs[-1]), str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dpkg -x {debs[-1].name} failed: {done.stderr.strip()[-500:]}")
    shutil.rmtree(unpacked, ignore_errors=True)
    tmp.rename(unpacked)
    (unpacked / ".complete").write_text(debs[-1].name + "\n")
    return unpacked
