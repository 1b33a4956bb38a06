"""Shared TOML settings helpers: table to dataclass and back, errors of the caller's type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from protocol.settings import build_section, dumps_toml, relative_path, section_values


class _Error(Exception):
    pass


@dataclass(frozen=True)
class _Table:
    name: str = "x"
    count: int | None = None
    rate: float | None = None
    file: Path | None = None


@dataclass(frozen=True)
class _Flags:
    enabled: bool = False


def test_build_section_resolves_paths_and_reads_zero_as_unset(tmp_path: Path) -> None:
    table = build_section(
        _Table, {"name": "a", "count": 0, "rate": 0.5, "file": "f.txt"}, "t", _Error, tmp_path
    )
    assert table == _Table(name="a", count=None, rate=0.5, file=tmp_path / "f.txt")
    assert build_section(_Table, {"file": ""}, "t", _Error).file is None


def test_optional_zero_keys_take_any_false_value_as_unset() -> None:
    assert build_section(_Table, {"rate": 0.0}, "t", _Error, optional_zero={"rate"}).rate is None
    assert build_section(_Table, {"count": 3}, "t", _Error, optional_zero={"count"}).count == 3


def test_unknown_key_raises_the_callers_error_with_key_section_and_valid_keys() -> None:
    with pytest.raises(_Error, match=r"unknown key\(s\) \['colour'\] in \[t\]; valid: name, count"):
        build_section(_Table, {"colour": "red"}, "t", _Error)


def test_section_values_inverts_build_section(tmp_path: Path) -> None:
    table = _Table(name="a", count=None, rate=None, file=tmp_path / "sub" / "f.txt")
    values = section_values(table, tmp_path, skip={"name"})
    assert values == {"count": 0, "rate": 0, "file": str(Path("sub") / "f.txt")}
    assert relative_path(None, tmp_path) == ""
    assert relative_path(Path("/elsewhere/f"), tmp_path) == "/elsewhere/f"


def test_dumps_toml_writes_text_tomllib_reads_back() -> None:
    sections = {
        "a": {"s": 'q"uo\\te', "b": True, "n": 3, "x": 0.25, "l": [1, 2]},
        "b": {"params": {"f": 1, "odd key": "v"}, "empty": {}},
    }
    text = dumps_toml(sections, _Error)
    assert '"odd key" = "v"' in text
    assert tomllib.loads(text) == sections


def test_dumps_toml_writes_infinity_as_toml_inf() -> None:
    text = dumps_toml({"a": {"hi": float("inf"), "lo": float("-inf")}}, _Error)
    assert tomllib.loads(text) == {"a": {"hi": float("inf"), "lo": float("-inf")}}


@pytest.mark.parametrize(("value", "match"), [(float("nan"), "NaN"), (object(), "object")])
def test_dumps_toml_refuses_what_toml_should_not_hold(value: object, match: str) -> None:
    with pytest.raises(_Error, match=match):
        dumps_toml({"a": {"v": value}}, _Error)


@pytest.mark.parametrize("value", ["false", "no", 0, 1])
def test_a_bool_field_takes_only_a_toml_boolean(value: object) -> None:
    with pytest.raises(_Error, match=rf"^t\.enabled must be true or false, got {value!r}$"):
        build_section(_Flags, {"enabled": value}, "t", _Error)
    assert build_section(_Flags, {"enabled": True}, "t", _Error).enabled is True
