"""Ed25519 signatures of bundle manifests (the ``cryptography`` library; no torch).

manifest.json lists the sha256 of every file of a bundle, so a signature of
its exact bytes covers the whole bundle.  ``manifest.sig`` is a small JSON
file: the algorithm, the signing key's id (sha256 of the raw public key,
first 16 hex digits: only to say which key signed in error messages) and the
64-byte signature in base64.  The private key never enters a bundle.

Keys are PEM files: ``PREFIX.key`` (PKCS#8 private key, mode 0600) and
``PREFIX.pub`` (SubjectPublicKeyInfo), made by ``fer-edge keygen``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from fer_edge.fileio import json_bytes
from fer_edge.targets.runtime import BundleError

SIGNATURE = "manifest.sig"   # beside manifest.json: the Ed25519 signature of its bytes

ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096   # the file is ~150 bytes; anything far bigger is not one
MAX_KEY_BYTES = 16384        # a PEM Ed25519 key is ~120 bytes
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def _read_key_file(path, what: str, exc_type, refuse_mode: int, advice: str) -> bytes:
    """A key file's bytes, refusing what others could read or replace (POSIX):
    a signing key others can read is no longer secret, a trusted key others can
    write is no longer the owner's choice."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise exc_type(f"{path}: the {what} is not a regular file")
        if os.name == "posix" and st.st_mode & refuse_mode:
            raise exc_type(f"{path}: the {what} is {advice} (mode {stat.S_IMODE(st.st_mode):o}): "
                           f"chmod {'600' if refuse_mode & 0o044 else '644'} it")
        if st.st_size > MAX_KEY_BYTES:
            raise exc_type(f"{path}: {st.st_size} bytes, too big for an Ed25519 {what}")
        return Path(path).read_bytes()
    except OSError as exc:
        raise exc_type(f"{path}: cannot read the {what} ({exc.strerror})") from None


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("signed bundles need the cryptography package (pip install cryptography)") from None
    return ed25519


def generate_keypair() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) of a fresh Ed25519 key."""
    from cryptography.hazmat.primitives import serialization as s

    key = _ed25519().Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:16]


def load_private_key(path):
    """The Ed25519 private key in a PEM file; ValueError (one line) for anything else."""
    from cryptography.hazmat.primitives import serialization as s

    ed25519 = _ed25519()
    data = _read_key_file(path, "signing key", ValueError, 0o077, "readable or writable by other users")
    try:
        key = s.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key (make one with fer-edge keygen)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key (make one with fer-edge keygen)")
    return key


def load_public_key(trust):
    """A public key from a ``.pub`` path, PEM bytes, 32 raw bytes or a key object.
    A private key is refused: it belongs on the build machine, not the device."""
    from cryptography.hazmat.primitives import serialization as s

    ed25519 = _ed25519()
    if isinstance(trust, ed25519.Ed25519PublicKey):
        return trust
    where = "the trusted key"
    if isinstance(trust, (str, Path)):
        where = str(trust)
        trust = _read_key_file(trust, "trusted public key", BundleError, 0o022, "writable by other users")
    if not isinstance(trust, (bytes, bytearray)):
        raise BundleError(f"trust must be a public key file, its bytes or a key, not {type(trust).__name__}")
    data = bytes(trust)
    if b"PRIVATE KEY" in data:
        raise BundleError(f"{where}: is a private key; give the device the public key (.pub)")
    if len(data) == 32:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    try:
        key = s.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise BundleError(f"{where}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{where}: not an Ed25519 public key")
    return key


def signature_file(private_key, manifest_bytes: bytes) -> bytes:
    """The content of manifest.sig for these exact manifest bytes."""
    sig = private_key.sign(manifest_bytes)
    doc = {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(sig).decode("ascii")}
    return json_bytes(doc)


def read_signature(path: Path) -> tuple[bytes, str | None]:
    """(signature, key id) from a bundle's manifest.sig; BundleError when absent or malformed."""
    f = path / SIGNATURE
    if f.is_symlink() or (f.exists() and not f.is_file()):
        raise BundleError(f"{path}/{SIGNATURE} is not a plain file (a link or a folder): refused")
    if not f.is_file():
        raise BundleError(f"{path}: unsigned bundle (no {SIGNATURE}); a trusted key was given, so only a "
                          "signed bundle runs")
    try:
        if f.stat().st_size > MAX_SIGNATURE_BYTES:
            raise ValueError
        doc = json.loads(f.read_bytes().decode("utf-8"))
        sig = base64.b64decode(doc["signature"], validate=True)
        algorithm = doc["algorithm"]
    except OSError as exc:
        raise BundleError(f"{path}/{SIGNATURE}: cannot be read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{path}/{SIGNATURE}: malformed signature file") from None
    if algorithm != ALGORITHM or len(sig) != 64:
        raise BundleError(f"{path}/{SIGNATURE}: not an Ed25519 signature")
    # The key id is only printed: anything but 16 hex digits (text made to look like
    # another message, a huge object) is ignored, not echoed.
    signer = doc.get("key_id")
    return sig, signer if isinstance(signer, str) and _KEY_ID.fullmatch(signer) else None


def verify_bundle_signature(path: Path, manifest_bytes: bytes, trust) -> str:
    """Check manifest.sig against these manifest bytes with the trusted key;
    returns the key id, raises BundleError saying what is wrong."""
    from cryptography.exceptions import InvalidSignature

    public = load_public_key(trust)
    sig, signer = read_signature(Path(path))
    try:
        public.verify(sig, manifest_bytes)
    except InvalidSignature:
        trusted = key_id(public)
        if signer and signer != trusted:
            raise BundleError(f"{path}: bad signature: signed with key {signer}, not the trusted key "
                              f"{trusted}") from None
        raise BundleError(f"{path}: bad signature: {SIGNATURE} does not match manifest.json "
                          "(altered after signing)") from None
    return key_id(public)
