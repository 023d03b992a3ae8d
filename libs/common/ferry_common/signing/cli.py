"""The one key CLI, behind both ``ferry keys ...`` and ``python -m ferry_common.signing ...``.

:func:`run_init` and :func:`run_generate` are the commands' bodies, for a CLI toolkit's
commands to call; :func:`main` is the argparse door.

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
from collections.abc import Callable, Sequence
from pathlib import Path

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


def run_init(directory: str, hosts: Sequence[str], clients: Sequence[str], prog: str = "ferry keys") -> int:
    """``init``: print the new key directory; 1 with the reason on stderr if it cannot be made."""
    return _run(lambda: [init_keydir(directory, hosts, clients)], prog)


def run_generate(directory: str, names: Sequence[str], prog: str = "ferry keys") -> int:
    """``generate``/``keygen``: print each file written; 1 with the reason on stderr otherwise."""
    return _run(lambda: [path for name in names for path in generate_keypair(directory, name)], prog)


def _run(work: Callable[[], list[Path]], prog: str) -> int:
    try:
        for path in work():
            print(path)
    except FileExistsError as exc:
        # replacing a key is a rotation, done on purpose (docs/security.md)
        print(f"{prog}: {exc.filename} exists: not overwritten", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m ferry_common.signing") -> int:
    """Run one key command; 0 on success (argparse exits 2 on bad arguments)."""
    args = parser(prog).parse_args(argv)
    if args.cmd == "init":
        return run_init(args.directory, args.host, args.client, prog)
    return run_generate(args.directory, args.names, prog)
