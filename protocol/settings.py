"""TOML helpers shared by the board and coordinator settings (``board.toml``, ``coord.toml``).

Both programs keep one frozen dataclass per TOML table. These helpers turn a parsed table into
such a dataclass (unknown keys refused, paths resolved against the file's directory, ``0``/``""``
read as "unset" for optional fields) and back, and write the tables as TOML text. Each program
raises its own ``ConfigError``: every helper that can fail takes that exception class as
``error``, so messages name the program's table and key while the code lives once.

The module uses only the standard library, so boards and coordinator can share it without either
importing the other (DESIGN.md §2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "build_section",
    "dumps_toml",
    "load_toml",
    "relative_path",
    "resolve_path",
    "section_values",
]

T = TypeVar("T")


def load_toml(
    path: str | os.PathLike[str], what: str, error: type[Exception]
) -> tuple[dict[str, Any], Path]:
    """The parsed TOML file ``path`` and the folder its relative paths are resolved against.

    Raises
    ------
    error
        The file cannot be read (``what`` names it: "board config", ...) or is not TOML.
    """
    file_path = Path(path)
    try:
        raw = tomllib.loads(file_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {what} {file_path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{file_path} is not valid TOML: {exc}") from None
    return raw, file_path.resolve().parent


def resolve_path(value: Any, base_dir: Path | None) -> Path:
    """``value`` as a path with ``~`` expanded, relative paths taken below ``base_dir``.

    Parameters
    ----------
    value : Any
        The TOML value (its ``str`` is the path).
    base_dir : Path or None
        Directory of the TOML file; ``None`` leaves relative paths relative.
    """
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def relative_path(path: Path | None, base: Path | None) -> str:
    """``path`` as TOML text: relative to ``base`` when it lies below it, ``""`` for ``None``."""
    if path is None:
        return ""
    if base is not None:
        try:
            return str(Path(path).resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


def build_section(
    cls: type[T],
    values: Mapping[str, Any],
    section: str,
    error: type[Exception],
    base_dir: Path | None = None,
    *,
    optional_zero: Collection[str] = (),
) -> T:
    """Build the dataclass ``cls`` from the TOML table ``[section]``.

    Fields typed ``Path`` are resolved with :func:`resolve_path` (empty: ``None``); a field typed
    ``... | None`` given ``0`` or ``""`` is ``None``; a key in ``optional_zero`` given any false
    value is ``None``; a field typed ``bool`` must be a TOML boolean (``"false"`` is text, which
    Python would read as true). Everything else is passed through to ``cls``, whose
    ``__post_init__`` validates it.

    Raises
    ------
    error
        If the table has a key that is not a field of ``cls`` (the message names the keys, the
        section and the valid keys), or a ``bool`` field is not ``true`` or ``false``.
    """
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(known)
    if unknown:
        raise error(f"unknown key(s) {sorted(unknown)} in [{section}]; valid: {', '.join(known)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        ftype = str(known[key].type)
        if ftype == "bool" and not isinstance(value, bool):
            raise error(f"{section}.{key} must be true or false, got {value!r}")
        if "Path" in ftype:
            out[key] = resolve_path(value, base_dir) if value else None
        elif key in optional_zero or (ftype.endswith("| None") and value in ("", 0)):
            out[key] = value or None
        else:
            out[key] = value
    return cls(**out)


def section_values(
    obj: Any, relative_to: Path | None, skip: Collection[str] = ()
) -> dict[str, Any]:
    """The fields of the dataclass ``obj`` as a TOML table (inverse of :func:`build_section`).

    Paths become text relative to ``relative_to`` (see :func:`relative_path`); ``None`` becomes
    ``0`` for numeric fields and ``""`` otherwise; fields named in ``skip`` are left out.
    """
    out: dict[str, Any] = {}
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, Path) or (value is None and "Path" in str(f.type)):
            out[f.name] = relative_path(value, relative_to)
        elif value is None:
            out[f.name] = 0 if ("int" in str(f.type) or "float" in str(f.type)) else ""
        else:
            out[f.name] = value
    return out


def _toml_value(value: Any, error: type[Exception]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, float) and math.isnan(value):
            raise error("cannot write NaN to TOML")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, error) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{_toml_key(k, error)} = {_toml_value(v, error)}" for k, v in value.items()
        )
        return "{ " + items + " }" if items else "{}"
    raise error(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str, error: type[Exception]) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return _toml_value(str(key), error)


def dumps_toml(
    sections: Mapping[str, Mapping[str, Any]],
    error: type[Exception],
    *,
    comments: Mapping[str, Mapping[str, str]] | None = None,
    header: str = "",
) -> str:
    """Write one level of ``[section]`` tables as TOML text.

    Values may be booleans, numbers (``inf`` included), strings, lists of values and inline
    tables (mappings); keys that are not bare TOML keys are quoted.

    ``comments[section][key]`` is written as ``#`` lines above the key, ``comments[section][""]``
    above the section's header, and ``header`` at the top of the file: a commented file reads
    as its own documentation and loads exactly as the plain one.

    Raises
    ------
    error
        For NaN or a value of another type.
    """
    notes = comments or {}

    def comment(text: str) -> list[str]:
        return [f"# {line}".rstrip() for line in text.strip().splitlines()] if text else []

    lines: list[str] = comment(header)
    for name, values in sections.items():
        if lines:
            lines.append("")
        section_notes = notes.get(name, {})
        lines += comment(section_notes.get("", ""))
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines += comment(section_notes.get(k, ""))
            lines.append(f"{_toml_key(k, error)} = {_toml_value(v, error)}")
    return "\n".join(lines) + "\n"
