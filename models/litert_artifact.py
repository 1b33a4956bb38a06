"""The LiteRT training artifact: what a board needs to train and alarm without TensorFlow.

Built once by :func:`models.litert_training.export_litert_training` (TensorFlow, on the
coordinator or a build machine) and shipped to boards in their bundle; per round only weights
travel. Reading it needs NumPy and the standard library only.

File format: a zip archive (stored, no code execution on load) with

* ``manifest.json`` -- format version, zoo model name, input shape, classes, optimizer and
  momentum, the weight layout (names and shapes), the SHA-256 of every other member, and what
  built it;
* ``train.tflite`` -- the training flatbuffer (signatures ``train``, ``gradient``, ``infer``,
  ``get_weights``, ``set_weights``, ``reset_optimizer``; builtin operators only);
* ``infer_frozen.tflite`` and ``infer_frozen.npz`` (optional) -- a constant-weight inference
  flatbuffer and where each weight sits in it (:class:`models.litert.FrozenExport`), for a
  faster alarm on convolutional models. The npz holds integer arrays only and is read with
  ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ArtifactError
from models.litert import FrozenExport
from models.weights import WeightLayout

#: Version of the artifact format; a board refuses another.
ARTIFACT_VERSION = 1
#: The artifact's file name in a board bundle.
ARTIFACT_FILE = "model-litert.zip"

_MANIFEST = "manifest.json"
_TRAIN = "train.tflite"
_FROZEN = "infer_frozen.tflite"
_PATCHES = "infer_frozen.npz"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TrainingArtifact:
    """A zoo model's LiteRT training flatbuffer and what describes it.

    Attributes
    ----------
    version : int
        :data:`ARTIFACT_VERSION` of the format.
    model : str
        Zoo name of the model.
    input_shape : tuple of int
        Shape of one input sample.
    num_classes : int
        Number of classes (logits).
    optimizer : str
        ``adam`` or ``sgd``: the optimizer inside the ``train`` signature.
    momentum : float
        SGD momentum (0 for Adam).
    layout : WeightLayout
        Layout of the flat weight vectors (the Keras model's, as the protocol carries it).
    train_flatbuffer : bytes
        The training flatbuffer.
    frozen : FrozenExport or None
        Constant-weight inference flatbuffer for the alarm, when the artifact carries one.
    built_with : str
        What converted it (e.g. ``tensorflow 2.21.0``).
    """

    version: int
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    optimizer: str
    momentum: float
    layout: WeightLayout
    train_flatbuffer: bytes
    frozen: FrozenExport | None = None
    built_with: str = ""

    def manifest(self) -> dict[str, Any]:
        """The artifact's ``manifest.json`` content (member hashes included)."""
        members = {_TRAIN: _sha256(self.train_flatbuffer)}
        if self.frozen is not None:
            members[_FROZEN] = _sha256(self.frozen.flatbuffer)
            members[_PATCHES] = _sha256(self._patches_bytes())
        return {
            "format": "siren-edge litert training artifact",
            "version": self.version,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "layout": [[name, list(shape)] for name, shape in self.layout.entries],
            "members": members,
            "built_with": self.built_with,
        }

    def _patches_bytes(self) -> bytes:
        assert self.frozen is not None
        # Positional arrays (saved as arr_0, arr_1, ...): the offsets, then each source.
        offsets = np.array([off for off, _ in self.frozen.patches], dtype=np.int64)
        sources = [np.asarray(source, dtype=np.int64) for _, source in self.frozen.patches]
        buf = io.BytesIO()
        np.savez(buf, offsets, *sources)
        return buf.getvalue()

    def to_bytes(self) -> bytes:
        """The artifact as a zip archive (identical bytes for identical content)."""
        members = [(_TRAIN, self.train_flatbuffer)]
        if self.frozen is not None:
            members += [(_FROZEN, self.frozen.flatbuffer), (_PATCHES, self._patches_bytes())]
        manifest = json.dumps(self.manifest(), indent=1, sort_keys=True).encode()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in [(_MANIFEST, manifest), *members]:
                entry = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                entry.external_attr = 0o644 << 16
                entry.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(entry, data)
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        """Write the artifact to ``path`` (atomically; folders created) and return it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(target)
        return target

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "artifact") -> TrainingArtifact:
        """Read an artifact; every member is checked against the manifest's SHA-256.

        Raises
        ------
        ArtifactError
            Not a zip, no manifest, another format version, a missing or altered member.
        """
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = set(zf.namelist())
                if _MANIFEST not in names:
                    raise ArtifactError(f"{source}: no {_MANIFEST}; not a LiteRT training artifact")
                manifest = json.loads(zf.read(_MANIFEST))
                if manifest.get("version") != ARTIFACT_VERSION:
                    raise ArtifactError(
                        f"{source}: artifact format version {manifest.get('version')!r}, this "
                        f"board reads version {ARTIFACT_VERSION}; rebuild it with this release"
                    )
                blobs = {}
                for name, digest in dict(manifest["members"]).items():
                    if name not in names:
                        raise ArtifactError(f"{source}: member {name} is missing")
                    blob = zf.read(name)
                    if _sha256(blob) != digest:
                        raise ArtifactError(f"{source}: member {name} does not match its SHA-256")
                    blobs[name] = blob
        except (zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{source}: not a readable LiteRT training artifact ({exc})"
            ) from None
        layout = WeightLayout(
            tuple((str(name), tuple(int(s) for s in shape)) for name, shape in manifest["layout"])
        )
        frozen = None
        if _FROZEN in blobs and _PATCHES in blobs:
            with np.load(io.BytesIO(blobs[_PATCHES]), allow_pickle=False) as arrays:
                offsets = [int(o) for o in arrays["arr_0"]]
                patches = tuple(
                    (off, np.asarray(arrays[f"arr_{i + 1}"], dtype=np.int64))
                    for i, off in enumerate(offsets)
                )
            frozen = FrozenExport(blobs[_FROZEN], patches, layout)
        if _TRAIN not in blobs:
            raise ArtifactError(f"{source}: member {_TRAIN} is missing")
        return cls(
            version=int(manifest["version"]),
            model=str(manifest["model"]),
            input_shape=tuple(int(s) for s in manifest["input_shape"]),
            num_classes=int(manifest["num_classes"]),
            optimizer=str(manifest["optimizer"]),
            momentum=float(manifest["momentum"]),
            layout=layout,
            train_flatbuffer=blobs[_TRAIN],
            frozen=frozen,
            built_with=str(manifest.get("built_with", "")),
        )

    @classmethod
    def load(cls, path: Path | str) -> TrainingArtifact:
        """Read an artifact file (see :meth:`from_bytes`).

        Raises
        ------
        ArtifactError
            The file cannot be read or is not a valid artifact.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ArtifactError(
                f"cannot read LiteRT training artifact {path}: {exc.strerror}"
            ) from None
        return cls.from_bytes(data, source=str(path))


__all__ = ["ARTIFACT_FILE", "ARTIFACT_VERSION", "ArtifactError", "TrainingArtifact"]
