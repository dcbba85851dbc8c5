"""``fer-edge keygen``: an Ed25519 key pair for signing bundles (converters/keys.py)."""
from __future__ import annotations

import argparse


def cmd_keygen(args: argparse.Namespace) -> int:
    from fer_edge.converters.keys import keygen
    from fer_edge.targets.signing import key_id, load_public_key

    private, public = keygen(args.out, args.force)
    print(f"wrote {private} (private, mode 0600: keep it on the build machine) and {public} "
          f"(key id {key_id(load_public_key(public))}: give it to the devices)")
    return 0


def add_keygen_parser(sub) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (convert --sign, "
                       "predict --trust)",
                       description="Write PREFIX.key (the private key, mode 0600: it stays on the build machine) "
                       "and PREFIX.pub (for the devices: fer-edge predict --trust PREFIX.pub).")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private) and PREFIX.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair (bundles signed with the "
                   "old key will no longer verify)")
    p.set_defaults(func=cmd_keygen)
