"""``siren keys``: generate board and coordinator key pairs, manage the allow-list.

Private keys are written with permissions 0600 and are never printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from protocol.errors import AllowListError, KeyFileError
from protocol.keys import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    AllowList,
    generate_signing_key,
    key_fingerprint,
    load_client_id,
    load_verify_key,
    resolve_verify_key,
    save_key_pair,
    verify_key_hex,
)
from siren_cli.errors import CommandError


def register(subparsers: Any) -> None:
    """Add the ``keys`` command group to the ``siren`` parser."""
    p = subparsers.add_parser(
        "keys",
        help="generate key pairs and manage the coordinator's allow-list",
        description="Generate Ed25519 key pairs for boards and the coordinator, and manage the "
        "allow-list of board public keys the coordinator accepts updates from.",
    )
    p.set_defaults(group_parser=p)
    actions = p.add_subparsers(dest="keys_command", metavar="ACTION")

    gen = actions.add_parser(
        "generate",
        help="create a new key pair in a directory",
        description=f"Write DIR/{PRIVATE_KEY_FILE} (mode 0600) and DIR/{PUBLIC_KEY_FILE}; "
        "print the public key and its fingerprint.",
    )
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="target directory")
    gen.add_argument("--client-id", help="board identifier to store next to the keys")
    gen.add_argument(
        "--force", action="store_true", help="replace an existing key pair in DIR (irreversible)"
    )
    gen.set_defaults(func=_generate)

    reg = actions.add_parser(
        "register",
        help="add a board's public key to an allow-list file",
        description="Add CLIENT_ID with its public key to the allow-list (the file is created "
        "if missing).",
    )
    reg.add_argument("--allow-list", required=True, type=Path, metavar="FILE")
    reg.add_argument("--client-id", required=True)
    reg.add_argument(
        "--public-key",
        required=True,
        metavar="FILE_OR_HEX",
        help="public key file, key directory, or 64 hex digits",
    )
    reg.add_argument(
        "--replace", action="store_true", help="rotate the key of an already registered client"
    )
    reg.set_defaults(func=_register)

    rev = actions.add_parser("revoke", help="remove a client from an allow-list file")
    rev.add_argument("--allow-list", required=True, type=Path, metavar="FILE")
    rev.add_argument("--client-id", required=True)
    rev.set_defaults(func=_revoke)

    lst = actions.add_parser("list", help="list the clients of an allow-list file")
    lst.add_argument("--allow-list", required=True, type=Path, metavar="FILE")
    lst.set_defaults(func=_list)

    show = actions.add_parser(
        "show", help="print the public key and fingerprint of a key directory or file"
    )
    show.add_argument("path", metavar="DIR_OR_FILE", help="key directory or public key file")
    show.set_defaults(func=_show)


def _generate(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    existing = Path(args.out) / PRIVATE_KEY_FILE
    if existing.exists() and not args.force:
        raise CommandError(
            f"{existing} already exists; pass --force to replace the key pair (irreversible: "
            "whoever trusts the old public key must get the new one)"
        )
    try:
        paths = save_key_pair(args.out, key, client_id=args.client_id, overwrite=args.force)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write keys to {args.out}: {exc.strerror}") from None
    public = key.verify_key
    print(f"private key: {paths.private_key} (mode 0600, keep it secret)")
    print(f"public key:  {paths.public_key}")
    if paths.client_id is not None:
        print(f"client id:   {args.client_id}")
    print(f"public key hex: {verify_key_hex(public)}")
    print(f"fingerprint:    {key_fingerprint(public)}")
    return 0


def _register(args: argparse.Namespace) -> int:
    try:
        key = resolve_verify_key(args.public_key)
        allow = AllowList.load(args.allow_list, missing_ok=True)
        changed = allow.add(args.client_id, key, replace=args.replace)
        if changed:
            allow.save(args.allow_list)
    except (KeyFileError, AllowListError) as exc:
        raise CommandError(str(exc)) from None
    state = "registered" if changed else "already registered"
    print(f"{state}: {args.client_id} {key_fingerprint(key)} in {args.allow_list}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        allow = AllowList.load(args.allow_list)
        allow.remove(args.client_id)
        allow.save(args.allow_list)
    except AllowListError as exc:
        raise CommandError(str(exc)) from None
    print(f"revoked: {args.client_id} from {args.allow_list}")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        allow = AllowList.load(args.allow_list)
    except AllowListError as exc:
        raise CommandError(str(exc)) from None
    for client_id in sorted(allow):
        print(f"{client_id} {key_fingerprint(allow[client_id])}")
    return 0


def _show(args: argparse.Namespace) -> int:
    path = Path(args.path)
    try:
        key = load_verify_key(path)
        client_id = load_client_id(path) if path.is_dir() else None
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    if client_id is not None:
        print(f"client id:      {client_id}")
    print(f"public key hex: {verify_key_hex(key)}")
    print(f"fingerprint:    {key_fingerprint(key)}")
    return 0
