"""The broker's side of provisioning: Mosquitto password-file lines and ACL entries (deploy/mosquitto/)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from flora.errors import FloraError
from flora.files import atomic_write_bytes
from flora.protocol.envelope import check_id

# What mosquitto_passwd 2.x writes: "$7$" is PBKDF2-HMAC-SHA512 with this many iterations and a 12-byte salt.
PASSWORD_ITERATIONS = 101
SALT_BYTES = 12

ACL_HEADER = """\
# FLoRA Edge ACL for Mosquitto 2 (acl_file). `flora provision` writes it and adds one block per device;
# deploy/mosquitto/acl is this template. Every account's username is its node id, and the listener's
# use_username_as_clientid makes it the client id too. A message too large for one packet also travels
# on {topic}/chunk/{i} (docs/PROTOCOL.md §2.1), so every rule has a chunk twin.

# Every account may publish its own status and its own update (any run), and nothing else unless a
# block below allows it: a device cannot speak for another device. It reads its own status (a second
# device using its id shows there: docs/PROTOCOL.md §5.1) and the notices addressed to it (§5.8).
pattern readwrite flora/v1/+/status/%u
pattern readwrite flora/v1/+/status/%u/chunk/+
pattern write flora/v1/+/update/%u
pattern write flora/v1/+/update/%u/chunk/+
pattern read flora/v1/+/notice/%u
pattern read flora/v1/+/notice/%u/chunk/+
"""

COORDINATOR_BLOCK = """
# The coordinator reads every status and update, and publishes instructions and round results.
user {coordinator}
topic readwrite flora/v1/#
"""

DEVICES_HEADER = """
# Devices (one block each, added by `flora provision`): read what is addressed to every device, the
# instruction, the round results and the coordinator's presence requests (protocol 1.2). Nothing else:
# not another device's update or status.
"""

DEVICE_BLOCK = """
user {node}
topic read flora/v1/+/instruction
topic read flora/v1/+/instruction/chunk/+
topic read flora/v1/+/metrics
topic read flora/v1/+/metrics/chunk/+
topic read flora/v1/+/presence
"""


def acl_template(coordinator_id: str = "coordinator") -> str:
    """The ACL with no devices yet: the own-topic patterns and the coordinator's account."""
    check_id(coordinator_id, "coordinator id")
    return ACL_HEADER + COORDINATOR_BLOCK.format(coordinator=coordinator_id) + DEVICES_HEADER


def device_acl_entry(node_id: str) -> str:
    return DEVICE_BLOCK.format(node=check_id(node_id, "node id"))


def add_device_to_acl(acl_file: Path, node_id: str, coordinator_id: str = "coordinator") -> bool:
    """Append the device's block (writing the template first if the file is new). False if already there."""
    exists = acl_file.is_file()
    text = acl_file.read_text() if exists else acl_template(coordinator_id)
    added = f"user {check_id(node_id, 'node id')}" not in text.splitlines()
    if added:
        text += device_acl_entry(node_id)
    if added or not exists:
        atomic_write_bytes(acl_file, text.encode())
    return added


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash ("$7$..."), as mosquitto_passwd writes it."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PASSWORD_ITERATIONS)
    return f"$7${PASSWORD_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_passwd_binary() -> str | None:
    for candidate in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def set_password(passwd_file: Path, username: str, password: str, *, use_mosquitto_passwd: bool = True) -> str:
    """Add or replace an account in a Mosquitto password file; returns the tool that hashed it.

    mosquitto_passwd (Debian's mosquitto package) when installed, so the hash suits the installed broker;
    otherwise the same "$7$" hash computed here (Mosquitto 2.0 or later reads it).
    """
    check_id(username, "username")  # no ':' or newline can reach the file
    passwd_file.parent.mkdir(parents=True, exist_ok=True)
    tool = mosquitto_passwd_binary() if use_mosquitto_passwd else None
    if tool is not None:
        create = [] if passwd_file.is_file() else ["-c"]
        try:
            subprocess.run(
                [tool, *create, "-b", str(passwd_file), username, password],
                check=True,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise FloraError(f"mosquitto_passwd could not write {passwd_file}: {exc} {detail.decode()[:300]}") from None
        os.chmod(passwd_file, 0o600)
        return "mosquitto_passwd"
    lines = passwd_file.read_text().splitlines() if passwd_file.is_file() else []
    kept = [line for line in lines if line.strip() and line.split(":", 1)[0] != username]
    kept.append(f"{username}:{password_hash(password)}")
    atomic_write_bytes(passwd_file, ("\n".join(kept) + "\n").encode())
    return "built-in"
