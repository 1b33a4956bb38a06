"""The lean board wheel: only the packages a board runs, and only the libraries they need.

A board runs ``siren client run``: the ``protocol``, ``models``, ``edge_client`` and
``siren_cli`` packages, TensorFlow (training), LiteRT (the alarm), PyNaCl, paho-mqtt and NumPy.
It also carries ``siren bench alarm`` (the on-device measurement), and nothing else of the
benchmarks. The desktop install (``pip install .``) also brings the coordinator, the
simulator, numba, scikit-learn, SciPy, matplotlib, FastAPI, prometheus_client and amqtt, none
of which a board imports. This module
writes a wheel of the board's packages straight from the installed sources (a wheel is a zip
with a ``.dist-info`` folder, PEP 427), so no build tool and no network is needed to make it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from collections.abc import Iterator
from pathlib import Path

from edge_client.provision import BOARD_REQUIREMENTS

#: Distribution name of the board wheel.
BOARD_DIST = "siren-edge-board"
#: Packages a board imports (with their subpackages).
BOARD_PACKAGES = ("protocol", "models", "edge_client", "siren_cli")
#: Single modules of other packages a board runs: the on-device alarm benchmark.
BOARD_MODULES = (
    "benchmarks/__init__.py",
    "benchmarks/cli.py",
    "benchmarks/alarm.py",
    "benchmarks/board_backends.py",
    "benchmarks/board_data.py",
)
#: Packages of the desktop install a board never needs (checked by the tests).
NOT_ON_BOARDS = (
    "sklearn",
    "scipy",
    "numba",
    "matplotlib",
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "amqtt",
)

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def project_version() -> str:
    """The installed project's version (``0.0.0`` when it is not installed as a distribution)."""
    try:
        return importlib.metadata.version("siren-edge")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _package_files(root: Path) -> Iterator[tuple[str, Path]]:
    for package in BOARD_PACKAGES:
        base = root / package
        if not (base / "__init__.py").exists():
            raise FileNotFoundError(f"package {package!r} not found under {root}")
        for path in sorted(base.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield path.relative_to(root).as_posix(), path
    for module in BOARD_MODULES:
        yield module, root / module


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"sha256={digest}"


def wheel_name(version: str | None = None) -> str:
    """File name of the board wheel."""
    return f"{BOARD_DIST.replace('-', '_')}-{version or project_version()}-py3-none-any.whl"


def build_board_wheel(out_dir: Path, *, source_root: Path | None = None) -> Path:
    """Write the board wheel into ``out_dir`` and return its path.

    The wheel holds :data:`BOARD_PACKAGES` from ``source_root`` (default: where this project's
    packages are), declares :data:`BOARD_REQUIREMENTS` and the ``siren`` console script. The
    same sources give byte-identical wheels (fixed file dates and order).
    """
    root = source_root or _SOURCE_ROOT
    version = project_version()
    dist = BOARD_DIST.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            f"Name: {BOARD_DIST}",
            f"Version: {version}",
            "Summary: siren-edge board program: SIREN alarm, local training, signed MQTT updates",
            "Requires-Python: >=3.10",
            *(f"Requires-Dist: {req}" for req in BOARD_REQUIREMENTS),
            "",
        ]
    )
    files: list[tuple[str, bytes]] = [
        (arcname, path.read_bytes()) for arcname, path in _package_files(root)
    ]
    files += [
        (f"{info}/METADATA", metadata.encode()),
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: siren-edge deploy\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n",
        ),
        (f"{info}/entry_points.txt", b"[console_scripts]\nsiren = siren_cli.main:main\n"),
        (f"{info}/top_level.txt", ("\n".join([*BOARD_PACKAGES, "benchmarks"]) + "\n").encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    record += f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel_name(version)
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            entry = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
    tmp.replace(target)
    return target
