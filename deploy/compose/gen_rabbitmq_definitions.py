"""The RabbitMQ users of docker-compose.yml: one per service per host, as scripts/rabbitmq-users.sh
makes them, written as a definitions file the broker loads at boot.

    .venv/bin/python deploy/compose/gen_rabbitmq_definitions.py           # write definitions.json
    .venv/bin/python deploy/compose/gen_rabbitmq_definitions.py --check   # exit 1 if it is stale

The users and their permissions are the script's own (run with DRY_RUN=1 and read back), so
the regexes are written once. Every password is ``ferry``: this is the development stack
(docs/operations.md says how production users get theirs).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-users.sh"
OUT = Path(__file__).resolve().parent / "rabbitmq" / "definitions.json"
HOSTS = ("host-a", "host-b")
CLIENTS = ("ops",)
PASSWORD = "ferry"
ADMIN = "ferry"  # the management UI's user (http://localhost:15672)


def password_hash(user: str, password: str = PASSWORD) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)),
    with a salt derived from the user name so that the file is reproducible."""
    salt = hashlib.sha256(user.encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def commands() -> list[list[str]]:
    """The rabbitmqctl commands the script would run for the compose stack."""
    env = {**os.environ, "DRY_RUN": "1", "FERRY_HOSTS": " ".join(HOSTS), "FERRY_CLIENTS": " ".join(CLIENTS),
           "RABBITMQCTL": "rabbitmqctl"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line)[1:] for line in out.splitlines() if line.strip()]


def definitions() -> dict[str, Any]:
    users: list[dict[str, Any]] = [{"name": ADMIN, "password_hash": password_hash(ADMIN), "tags": ["administrator"],
                                    "hashing_algorithm": "rabbit_password_hashing_sha256"}]
    permissions: list[dict[str, str]] = [{"user": ADMIN, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]
    topic: list[dict[str, str]] = []
    for cmd in commands():
        if cmd[0] == "add_user":
            users.append({"name": cmd[1], "password_hash": password_hash(cmd[1]), "tags": [],
                          "hashing_algorithm": "rabbit_password_hashing_sha256"})
        elif cmd[0] == "set_permissions":  # set_permissions -p VHOST USER CONF WRITE READ
            _, _, vhost, user, conf, write, read = cmd
            permissions.append({"user": user, "vhost": vhost, "configure": conf, "write": write, "read": read})
        elif cmd[0] == "set_topic_permissions":  # set_topic_permissions -p VHOST USER EXCHANGE WRITE READ
            _, _, vhost, user, exchange, write, read = cmd
            topic.append({"user": user, "vhost": vhost, "exchange": exchange, "write": write, "read": read})
        else:
            raise ValueError(f"rabbitmq-users.sh runs {cmd[0]}, which this does not know")
    return {"users": users, "vhosts": [{"name": "/"}], "permissions": permissions, "topic_permissions": topic}


def render() -> str:
    return json.dumps(definitions(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args(argv)
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != render():
            print(f"{OUT} is stale: run {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
