"""PEFT's source distribution (it ships PEFT's test suite), downloaded once and unpacked in a cache.

``pip download --no-binary :all: --no-deps peft==<installed version>`` into
``~/.cache/geoprobe/peft-sdist/`` (``GEOPROBE_PEFT_SDIST_CACHE`` moves it); a tarball already there is
reused, so only the first run needs PyPI.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["Sdist", "cache_dir", "fetch", "pypi_reachable"]

CACHE_ENV = "GEOPROBE_PEFT_SDIST_CACHE"
DOWNLOAD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Sdist:
    """An unpacked PEFT sdist: ``root`` holds ``src/`` and ``tests/``."""

    version: str
    root: Path

    @property
    def tests(self) -> Path:
        return self.root / "tests"


def cache_dir() -> Path:
    """Where tarballs and unpacked trees live (``$GEOPROBE_PEFT_SDIST_CACHE`` or the default)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "geoprobe" / "peft-sdist")


def pypi_reachable(host: str = "pypi.org", timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to PyPI's port 443 opens."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _tarball(cache: Path, version: str) -> Optional[Path]:
    found = sorted(cache.glob(f"peft-{version}.tar.gz"))
    return found[0] if found else None


def _download(cache: Path, version: str) -> tuple[Optional[Path], str]:
    """``pip download`` the sdist into ``cache``; returns the tarball (or None) and pip's output."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", "-d", tmp, f"peft=={version}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            return None, f"pip download timed out after {exc.timeout} s"
        got = _tarball(Path(tmp), version)
        if got is None:
            return None, (done.stdout + done.stderr)[-3000:]
        target = cache / got.name
        os.replace(got, target)
        return target, ""


def _unpack(tarball: Path, version: str) -> Path:
    """Unpack ``tarball`` next to itself (once) and return the source root."""
    root = tarball.parent / f"peft-{version}"
    if not (root / "tests" / "test_custom_models.py").is_file():
        with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
            with tarfile.open(tarball) as archive:
                archive.extractall(tmp, filter="data")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(Path(tmp) / f"peft-{version}", root)
    # PEFT's tests import their helpers relatively (``from .testing_common import ...``)
    (root / "tests" / "__init__.py").touch()
    return root


def fetch(version: str) -> tuple[Optional[Sdist], str]:
    """The unpacked sdist of PEFT ``version``, or None and why (pip's output) when it cannot be had."""
    cache = cache_dir()
    tarball = _tarball(cache, version) if cache.is_dir() else None
    why = ""
    if tarball is None:
        tarball, why = _download(cache, version)
    if tarball is None:
        return None, why
    return Sdist(version, _unpack(tarball, version)), ""
