"""What an operator can do to a running run: pause it, ban a board, rotate or revoke a key.

:class:`OperatorActions` holds the actions themselves; the round engine
(:class:`coordinator.engine.RoundEngine`) has them, applies them to its own state, and persists
and audits each one. :class:`ServiceControls` is what the HTTP API's admin endpoints call
(:class:`coordinator.api.CoordinatorControls`): it runs each action on the running service's
thread, between two messages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from nacl.signing import VerifyKey

from coordinator.config import CoordinatorConfig
from coordinator.store import CoordinatorStore
from protocol.keys import key_fingerprint

logger = logging.getLogger(__name__)


class OperatorActions:
    """The operator's actions on a run, as methods of the round engine.

    They change the engine's ``paused``, ``admin_banned``, ``keys`` and ``revoked``, persist the
    change in the store (a restarted coordinator keeps it) and append an audit record. The
    engine calls them on its own thread (the service's, through :class:`ServiceControls`).
    """

    config: CoordinatorConfig
    store: CoordinatorStore
    keys: dict[str, VerifyKey]
    admin_banned: set[str]
    revoked: dict[str, VerifyKey]
    paused: bool

    @property
    def round(self) -> int:
        """The open round (the engine's)."""
        raise NotImplementedError

    def _audit(self, kind: str, **body: Any) -> None:
        """Append an operator or key-change record to the audit log now (the engine's)."""
        raise NotImplementedError

    def _drop_admitted(self, client: str, why: str) -> bool:
        """Take ``client``'s admitted update out of the engine's open round and the store
        (counted as ``quarantined`` with ``why``); whether it had one."""
        state = getattr(self, "state", None)
        if state is None or client not in state.admitted:
            return False
        entry = state.admitted.pop(client)
        state.update_bytes -= entry.nbytes
        state.dropped.add(client)
        self.store.quarantine(state.round, client, why)
        return True

    def set_paused(self, paused: bool) -> bool:
        """Stop (or resume) closing rounds; updates are still admitted. Returns whether it
        changed. Persisted: a restarted coordinator stays paused."""
        if self.paused == paused:
            return False
        self.paused = paused
        self.store.set_meta("paused", "1" if paused else "0")
        self._audit("operator", action="pause" if paused else "resume", round=self.round)
        logger.warning("closing rounds %s by an operator", "paused" if paused else "resumed")
        return True

    def set_banned(self, client: str, banned: bool) -> bool:
        """Ban (or unban) a board: while banned its signed updates are refused as ``banned``
        and rounds do not wait for it. Returns whether it changed; persisted.

        Raises
        ------
        LookupError
            If ``client`` is not one of the run's boards.
        """
        if client not in self.keys:
            raise LookupError(f"{client!r} is not a board of run {self.config.run!r}")
        if (client in self.admin_banned) == banned:
            return False
        if banned:
            self.admin_banned.add(client)
        else:
            self.admin_banned.discard(client)
        self.store.set_meta("admin_banned", json.dumps(sorted(self.admin_banned)))
        self._audit(
            "operator", action="ban" if banned else "unban", client=client, round=self.round
        )
        logger.warning("board %s %s by an operator", client, "banned" if banned else "unbanned")
        return True

    def register_key(self, client: str, key: VerifyKey) -> bool:
        """Rotate a board's public key, in memory and in the allow-list file.

        Raises
        ------
        ValueError
            If ``client`` is not one of the run's boards (a round's boards are fixed when the
            run starts), or the key already belongs to another board.
        """
        from protocol.errors import AllowListError
        from protocol.keys import AllowList

        if client not in self.keys:
            raise ValueError(
                f"{client!r} is not a board of run {self.config.run!r}; the run's boards are "
                "fixed when it starts"
            )
        readmit = client in self.revoked
        if readmit and bytes(self.revoked[client]) == bytes(key):
            raise ValueError(f"that key of {client!r} was revoked: register a new key")
        if not readmit and bytes(self.keys[client]) == bytes(key):
            return False
        try:
            allow = AllowList.load(self.config.allow_list, missing_ok=True)
            allow.add(client, key, replace=True)
            allow.save(self.config.allow_list)
        except AllowListError as exc:
            raise ValueError(str(exc)) from None
        self.keys[client] = key
        action = "readmit" if readmit else "rotate"
        if readmit:
            del self.revoked[client]
            self._save_revoked()
        self._audit(
            "keys", action=action, client=client, key=key_fingerprint(key), round=self.round
        )
        logger.warning(
            "board %s %s by an operator (key %s)",
            client,
            "re-admitted with a new key" if readmit else "has a new public key",
            key_fingerprint(key)[:16],
        )
        return True

    def revoke_key(self, client: str) -> bool:
        """Revoke a board's key now: it leaves the allow-list, admission has no key for it (its
        signed updates count as ``revoked``), rounds stop waiting for it, and an update it sent
        in the open round is taken out of the round (``quarantined``); persisted and logged.
        Returns whether it changed. Re-admit the board with :meth:`register_key` (a new key).

        Raises
        ------
        LookupError
            If ``client`` is not one of the run's boards.
        """
        from protocol.errors import AllowListError
        from protocol.keys import AllowList

        if client not in self.keys:
            raise LookupError(f"{client!r} is not a board of run {self.config.run!r}")
        if client in self.revoked:
            return False
        try:
            allow = AllowList.load(self.config.allow_list, missing_ok=True)
            if client in allow:
                allow.remove(client)
                allow.save(self.config.allow_list)
        except AllowListError as exc:
            raise ValueError(str(exc)) from None
        # A revoked board is one the operator no longer trusts: what it sent in the open round
        # is not aggregated either. Taken out first, so no restart can bring it back.
        dropped = self._drop_admitted(client, "its key was revoked by an operator")
        self.revoked[client] = self.keys[client]
        self._save_revoked()
        self._audit(
            "keys",
            action="revoke",
            client=client,
            key=key_fingerprint(self.keys[client]),
            round=self.round,
        )
        logger.warning("key of board %s revoked by an operator", client)
        if dropped:
            logger.warning(
                "round %d: the update board %s sent before its key was revoked is dropped",
                self.round,
                client,
            )
        return True

    def _save_revoked(self) -> None:
        self.store.set_meta(
            "revoked", json.dumps({c: bytes(k).hex() for c, k in sorted(self.revoked.items())})
        )


class _Service(Protocol):
    """The running service, as :class:`ServiceControls` sees it."""

    engine: Any

    def call(self, action: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``action`` on the service's thread and return its result."""
        ...


class ServiceControls:
    """The admin actions of the HTTP API (``coordinator.api.CoordinatorControls``), applied on
    the running service's thread.

    Parameters
    ----------
    service : coordinator.service.CoordinatorService
        The running service.
    timeout : float
        Seconds an action may wait for the service (then ``TimeoutError``).
    """

    def __init__(self, service: _Service, timeout: float = 5.0) -> None:
        self.service = service
        self.timeout = timeout

    def is_paused(self) -> bool:
        """Whether closing rounds is paused."""
        return self.service.engine.paused

    def admin_banned(self) -> frozenset[str]:
        """Boards banned by an operator."""
        return frozenset(self.service.engine.admin_banned)

    def pause(self) -> bool:
        """Stop closing rounds; ``True`` if it was running."""
        return bool(self.service.call(lambda: self.service.engine.set_paused(True), self.timeout))

    def resume(self) -> bool:
        """Close rounds again; ``True`` if it was paused."""
        return bool(self.service.call(lambda: self.service.engine.set_paused(False), self.timeout))

    def ban(self, client_id: str) -> bool:
        """Refuse the board's updates; ``True`` if it was not banned."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.set_banned(client_id, True), self.timeout))

    def unban(self, client_id: str) -> bool:
        """Accept the board's updates again; ``True`` if it was banned."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.set_banned(client_id, False), self.timeout))

    def register_key(self, client_id: str, public_key: VerifyKey) -> bool:
        """Rotate a board's public key (or re-admit a revoked board); ``True`` if it changed."""
        engine = self.service.engine
        return bool(
            self.service.call(lambda: engine.register_key(client_id, public_key), self.timeout)
        )

    def revoke(self, client_id: str) -> bool:
        """Revoke the board's key; ``True`` if it was not revoked."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.revoke_key(client_id), self.timeout))

    def revoked(self) -> frozenset[str]:
        """Boards whose key is revoked."""
        return frozenset(self.service.engine.revoked)
