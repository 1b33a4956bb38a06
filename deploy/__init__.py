"""Deployment tooling: a whole deployment folder (coordinator, broker, board bundles) in one go.

``siren deploy init`` writes, in the order that works, the coordinator's key pair and a
commented ``coord.toml``, a private CA with the broker's server certificate, the Mosquitto
configuration (TLS only, anonymous off, per-board credentials and topic ACLs, files owned by the
account Mosquitto runs as), and one self-installing bundle per board that carries the CA, the
pinned coordinator key, its credentials and a lean board wheel. ``siren deploy add-board`` adds
boards later. This package writes files for both sides, so it sits above ``coordinator`` and
``edge_client`` (DESIGN.md §2).
"""
