"""What the running coordinator service offers the admin endpoints.

:class:`coordinator.controls.ServiceControls` implements :class:`CoordinatorControls` over the
running :class:`coordinator.service.CoordinatorService`; tests implement it in memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from nacl.signing import VerifyKey


@runtime_checkable
class CoordinatorControls(Protocol):
    """What the running coordinator service offers the admin endpoints.

    The API calls these from its own threads; an implementation applies the action on the
    service's thread (or under a lock) and returns once it took effect.

    Every action returns whether it changed anything (``False``: already in that state). They
    raise ``LookupError`` for a client the run does not know (answered 404), ``ValueError``
    for an action refused in the current state, with the reason as message (answered 409), and
    ``TimeoutError`` when the service could not act in time (answered 503).
    """

    def is_paused(self) -> bool:
        """Whether closing rounds is paused."""
        ...

    def admin_banned(self) -> frozenset[str]:
        """Clients banned by an operator (their updates are refused)."""
        ...

    def pause(self) -> bool:
        """Stop closing rounds (updates are still admitted); ``True`` if it was running."""
        ...

    def resume(self) -> bool:
        """Close rounds again; ``True`` if it was paused."""
        ...

    def ban(self, client_id: str) -> bool:
        """Refuse the client's updates from now on; ``True`` if it was not banned."""
        ...

    def unban(self, client_id: str) -> bool:
        """Accept the client's updates again; ``True`` if it was banned."""
        ...

    def register_key(self, client_id: str, public_key: VerifyKey) -> bool:
        """Register (or rotate) a board's public key in the allow-list (a board whose key was
        revoked is re-admitted with the new key); ``True`` if it changed."""
        ...

    def revoke(self, client_id: str) -> bool:
        """Revoke the board's key now (it leaves the allow-list); ``True`` if it changed."""
        ...

    def revoked(self) -> frozenset[str]:
        """Boards whose key is revoked."""
        ...
