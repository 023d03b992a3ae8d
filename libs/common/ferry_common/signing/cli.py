"""The one key CLI, behind both ``ferry keys ...`` and ``python -m ferry_common.signing ...``.

``init DIR --host H --client C``
    a complete key directory (keys, ``trust.json``, ``permissions.json``);
``generate --dir DIR NAME...``
    key pairs ``NAME.key`` (0600) and ``NAME.pub``; refuses to overwrite a private key;
``keygen DIR NAME``
    the same for one name, as older scripts and docs spell it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .keys import generate_keypair, init_keydir


def parser(prog: str = "python -m ferry_common.signing") -> argparse.ArgumentParser:
    """The key commands' argument parser."""
    p = argparse.ArgumentParser(prog=prog, description="message-signing keys")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create keys, trust.json and permissions.json")
    init.add_argument("directory")
    init.add_argument("--host", action="append", default=[])
    init.add_argument("--client", action="append", default=[])
    gen = sub.add_parser("generate", help="write NAME.key (0600) and NAME.pub into DIR")
    gen.add_argument("--dir", required=True, dest="directory")
    gen.add_argument("names", nargs="+")
    keygen = sub.add_parser("keygen", help="write NAME.key (0600) and NAME.pub into DIRECTORY")
    keygen.add_argument("directory")
    keygen.add_argument("names", nargs=1, metavar="name")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m ferry_common.signing") -> int:
    """Run one key command; 0 on success (argparse exits 2 on bad arguments)."""
    args = parser(prog).parse_args(argv)
    try:
        if args.cmd == "init":
            print(init_keydir(args.directory, args.host, args.client))
            return 0
        for name in args.names:
            for path in generate_keypair(args.directory, name):
                print(path)
    except FileExistsError as exc:
        # replacing a key is a rotation, done on purpose (docs/security.md)
        print(f"{prog}: {exc.filename} exists: not overwritten", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
