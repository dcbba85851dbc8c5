"""An Ed25519 key pair for signing bundles (``fer-edge keygen``).

PREFIX.key is the private key (PEM, unencrypted, mode 0600: it signs what
devices will run, so it stays on the build machine); PREFIX.pub is what goes
to the devices (``fer-edge predict --trust PREFIX.pub``).  Both are written
through a temp file and renamed, the private one 0600 before a byte is in it;
neither is overwritten without ``force``.
"""
from __future__ import annotations

from pathlib import Path

from fer_edge import UserError
from fer_edge.fileio import check_writable_parent, os_error_line, refuse_existing, write_bytes_atomic


def key_paths(prefix) -> tuple[Path, Path]:
    prefix = Path(prefix)
    if not prefix.name or prefix.name in (".", ".."):
        raise UserError(f"--out {prefix}: give a file name prefix, like keys/fer")
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")


def check_key_paths(prefix, force: bool) -> tuple[Path, Path]:
    """Both files can be written (and may be replaced): checked before a key exists."""
    private, public = key_paths(prefix)
    for p in (private, public):
        try:
            refuse_existing(p, force)
            check_writable_parent(p, "--out")
        except OSError as exc:  # a name the file system refuses (too long, ...)
            raise UserError(os_error_line(exc, p)) from None
    return private, public


def keygen(prefix, force: bool = False) -> tuple[Path, Path]:
    """Write PREFIX.key and PREFIX.pub; returns their paths."""
    from fer_edge.targets.bundle import BundleError
    from fer_edge.targets.signing import generate_keypair

    private, public = check_key_paths(prefix, force)
    try:
        private_pem, public_pem = generate_keypair()
    except BundleError as exc:  # cryptography missing
        raise UserError(str(exc)) from None
    write_bytes_atomic(private, private_pem, force=force, mode=0o600)
    try:
        write_bytes_atomic(public, public_pem, force=force, mode=0o644)
    except BaseException:
        private.unlink(missing_ok=True)  # half a pair is no pair: nothing signed with it could be checked
        raise
    return private, public
