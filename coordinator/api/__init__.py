"""The coordinator's HTTP API and live dashboard (FastAPI), served on a loopback port.

:func:`create_app` builds the application from the coordinator's settings, its SQLite store and
an optional :class:`CoordinatorControls` (the running service, for the admin actions);
:func:`start_api_server` serves it with uvicorn on a background thread.

Endpoints (the OpenAPI schema is at ``/api/openapi.json``; ``docs/api.md`` describes them):

* read-only, no token: ``GET /api/health``, ``/api/run``, ``/api/rounds``,
  ``/api/rounds/{round}``, ``/api/clients``, ``/api/clients/{client_id}``, ``/api/model``,
  ``/api/model/download`` (the signed global message, byte for byte, so a board can verify it
  with the pinned coordinator key) and ``GET /metrics`` (Prometheus text format);
* admin, ``Authorization: Bearer <api_token>``: ``POST /api/admin/pause``,
  ``/api/admin/resume``, ``/api/admin/clients/{client_id}/ban``,
  ``/api/admin/clients/{client_id}/unban`` and ``/api/admin/keys``. Without the right token
  they answer 401; with no token configured admin actions are disabled (401 as well). Tokens
  are compared in constant time (on their SHA-256 digests) and never logged or returned;
* ``GET /`` -- the dashboard (static files of ``coordinator/dashboard``, no external resource).

The package follows the resources: one router per resource in :mod:`coordinator.api.routes`
(``runs``, ``boards``, ``model``, ``metrics``, ``admin``, ``dashboard``) and the response models
in :mod:`coordinator.api.schemas`. The routes depend (:mod:`coordinator.api.deps`) on the
answers (:mod:`coordinator.api.answers`, over :mod:`coordinator.api.records` and the read-only
:mod:`coordinator.api.store_view`) and, for the admin actions, on the running service's
:mod:`coordinator.api.controls`. The ``/metrics`` series are in :mod:`coordinator.api.metrics`,
the application in :mod:`coordinator.api.app` and the uvicorn server in
:mod:`coordinator.api.server`.

**Reading the store.** The app reads the coordinator's database through its own read-only
connection, one transaction per request (:mod:`coordinator.api.store_view`): a response is a
consistent snapshot even while a round closes, and the API cannot write the database.

**User input never causes a 5xx.** Path and query values are bounded in the schema (rounds are
``1 ≤ n ≤ 2^53 − 1``, client ids follow the protocol's identifier rule, bodies forbid unknown
fields), so malformed input gets 422; an unknown client or a round that does not exist gets 404
with a message naming what exists. Only the coordinator's own state can give a 5xx: 503 while
the run is not yet started or the database is unreadable, and 503 when the service did not carry
out an admin action in time.
"""

from coordinator.api.app import LOOPBACK_HOSTS, create_app
from coordinator.api.controls import CoordinatorControls
from coordinator.api.server import ApiServer, start_api_server

__all__ = ["LOOPBACK_HOSTS", "ApiServer", "CoordinatorControls", "create_app", "start_api_server"]
