"""``fer-edge keygen``: an Ed25519 key pair for signing bundles.

PREFIX.key is the private key (PEM, unencrypted, mode 0600: it signs what
devices will run, so it stays on the build machine); PREFIX.pub is what goes
to the devices (``fer-edge predict --trust PREFIX.pub``).  Both are written
through a temp file and renamed; neither is overwritten without --force.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from fer_edge import UserError


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Atomic write of a file whose mode is set before a byte is in it (mkstemp
    creates 0600), so the private key is never readable by others, even briefly."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keygen(prefix, force: bool = False) -> tuple[Path, Path]:
    from fer_edge.targets.bundle import BundleError
    from fer_edge.targets.signing import generate_keypair

    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (private, public):
        if p.exists() and not force:
            raise UserError(f"{p} exists; pass --force to replace the key pair (bundles signed with the old "
                            "key will no longer verify)")
    if not prefix.parent.is_dir():
        raise UserError(f"{prefix.parent}: no such folder")
    try:
        private_pem, public_pem = generate_keypair()
    except BundleError as exc:  # cryptography missing
        raise UserError(str(exc)) from None
    write_private(private, private_pem, 0o600)
    write_private(public, public_pem, 0o644)
    return private, public


def cmd_keygen(args: argparse.Namespace) -> int:
    from fer_edge.targets.signing import key_id, load_public_key

    private, public = keygen(args.out, args.force)
    print(f"wrote {private} (private, mode 0600: keep it on the build machine) and {public} "
          f"(key id {key_id(load_public_key(public))}: give it to the devices)")
    return 0


def add_keygen_parser(sub) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (convert --sign, "
                       "predict --trust)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private) and PREFIX.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=cmd_keygen)
