"""The run's boards: which are expected, in which order, with which key; which are revoked.

:func:`expected_clients` fixes the boards of a run and their order (a board's index is its place);
:func:`revoked_keys` reads the keys an operator revoked during the run. :class:`KeyView` is what
admission looks keys up in: the boards' keys without those an operator banned or revoked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from nacl.signing import VerifyKey

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.store import CoordinatorStore


def expected_clients(
    config: CoordinatorConfig,
    allow: Mapping[str, VerifyKey],
    revoked: Mapping[str, VerifyKey] | None = None,
) -> dict[str, VerifyKey]:
    """The expected boards in index order with their keys (``clients`` or the allow-list).

    ``revoked``: boards whose key was revoked during the run (:func:`revoked_keys`); they keep
    their place in the run with their old key, which no longer admits anything.

    Raises
    ------
    ConfigError
        If an expected board has no key in the allow-list, or there is no board at all.
    """
    gone = dict(revoked or {})
    clients = list(config.clients) or sorted({*allow, *gone})
    missing = [c for c in clients if c not in allow and c not in gone]
    if missing:
        raise ConfigError(f"expected boards without a key in {config.allow_list}: {missing}")
    if not clients:
        raise ConfigError(f"no boards: {config.allow_list} is empty and coordinator.clients too")
    return {c: allow[c] if c in allow else gone[c] for c in clients}


def revoked_keys(store: CoordinatorStore) -> dict[str, VerifyKey]:
    """The boards whose key an operator revoked in this run, with the revoked key."""
    raw = json.loads(store.get_meta("revoked") or "{}")
    return {str(c): VerifyKey(bytes.fromhex(h)) for c, h in raw.items()}


class KeyView(Mapping[str, VerifyKey]):
    """The boards' keys without the banned or revoked boards (a live view of both)."""

    def __init__(self, keys: dict[str, VerifyKey], banned: Any) -> None:
        self._keys = keys
        self._banned = banned

    def __getitem__(self, client: str) -> VerifyKey:
        if client in self._banned:
            raise KeyError(client)
        return self._keys[client]

    def __iter__(self) -> Iterator[str]:
        return (c for c in self._keys if c not in self._banned)

    def __len__(self) -> int:
        return sum(1 for c in self._keys if c not in self._banned)


class AnyOf:
    """Membership in any of several live collections (banned ids, revoked keys)."""

    def __init__(self, *parts: Any) -> None:
        self._parts = parts

    def __contains__(self, item: object) -> bool:
        return any(item in part for part in self._parts)
