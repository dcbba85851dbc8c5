"""An Ed25519 key pair for signing bundles (``fer-edge keygen``).

PREFIX.key is the private key (PEM, unencrypted, mode 0600: it signs what
devices will run, so it stays on the build machine); PREFIX.pub is what goes
to the devices (``fer-edge predict --trust PREFIX.pub``).  Both are written
through a temp file and renamed, the private one 0600 before a byte is in it;
neither is overwritten without ``force``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fer_edge import UserError
from fer_edge.fileio import (check_writable_parent, os_error_line, refuse_existing, refuse_special,
                             write_bytes_atomic)


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
            refuse_special(p)
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
    replace_pair(private, private_pem, public, public_pem)
    return private, public


def replace_pair(private: Path, private_pem: bytes, public: Path, public_pem: bytes) -> None:
    """Both keys written in full to temp files first, then renamed into place,
    the public one first: a failure leaves the old pair (or none), never half of
    each (an old private key whose public key is gone signs what no device checks)."""
    old_public = public.read_bytes() if public.is_file() else None
    temps = []
    try:
        private.parent.mkdir(parents=True, exist_ok=True)
        public.parent.mkdir(parents=True, exist_ok=True)
        for path, data, mode in ((private, private_pem, 0o600), (public, public_pem, 0o644)):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append(tmp)
            os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)   # before a byte is in it
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        os.replace(temps[1], public)
        try:
            os.replace(temps[0], private)
        except BaseException:
            if old_public is None:
                public.unlink(missing_ok=True)
            else:
                write_bytes_atomic(public, old_public, force=True, mode=0o644)
            raise
    except OSError as exc:
        raise UserError(os_error_line(exc, public)) from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
