"""`flora provision`: everything a device (and, once, the coordinator) needs to join a secured fleet.

All of it goes into one provisioning directory, kept by the operator (it holds secrets):

    OUT/mosquitto/passwd, acl          -> /etc/mosquitto/flora/ on the broker host
    OUT/coordinator/                   -> /etc/flora/ on the coordinator host
        coordinator.toml               broker account, signing_key, device_keys_dir, require_signatures
        coordinator.key, coordinator.pub    the coordinator's Ed25519 key pair
        device-keys/NODE.pub           every device's public key
        tls/ca.crt                     with --certs
    OUT/devices/NODE/                  -> /etc/flora/ on that device
        client.toml                    broker account, signing_key, coordinator_public_key, TLS files
        signing.key                    the device's Ed25519 private key (it never leaves the device)
        coordinator.pub                the key the coordinator's instructions must be signed with
        tls/ca.crt, tls/client.crt, tls/client.key     with --certs (the certificate when made for NODE)

The configs name the files where they will be installed (`install_dir`, default /etc/flora), or where
they were written (`install_dir=None`). The first device creates the coordinator's account and keys.
Config classes are passed in by the caller (flora/cli.py), since the core imports no role.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flora.app.provision.broker import add_device_to_acl, set_password
from flora.errors import ConfigError
from flora.files import atomic_write_bytes
from flora.protocol.signing import generate_private_key, write_private_key, write_public_key
from flora.protocol.topics import check_safe_id

# Renders a role's settings (a flat mapping) as the TOML text of its config file, validating them.
RenderConfig = Callable[[dict[str, Any]], str]


@dataclasses.dataclass
class ProvisionSettings:
    out: Path
    broker_url: str = "mqtts://broker.local:8883"
    run_id: str = "default"
    coordinator_id: str = "coordinator"
    install_dir: Path | None = Path("/etc/flora")  # None: configs name the files where they were written
    certs_dir: Path | None = None  # make-certs.sh output: ca.crt, and NODE.crt + NODE.key when made
    use_mosquitto_passwd: bool = True
    force: bool = False

    def __post_init__(self):
        from flora.transport.base import TransportError
        from flora.transport.mqtt import parse_broker_url

        _check(self.run_id, "run id")
        _check(self.coordinator_id, "coordinator id")
        try:
            parse_broker_url(self.broker_url)
        except TransportError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def mosquitto_dir(self) -> Path:
        return self.out / "mosquitto"

    @property
    def coordinator_dir(self) -> Path:
        return self.out / "coordinator"

    def device_dir(self, node_id: str) -> Path:
        return self.out / "devices" / node_id


@dataclasses.dataclass
class Provisioned:
    node_id: str
    directory: Path  # what to copy to install_dir on that machine
    config_file: Path
    password_tool: str  # mosquitto_passwd or built-in
    created: bool = True  # False: the coordinator already existed and was left alone


def provision_coordinator(settings: ProvisionSettings, render: RenderConfig) -> Provisioned:
    """The coordinator's account, key pair and config; kept as they are when they already exist."""
    node = _check(settings.coordinator_id, "coordinator id")
    home = settings.coordinator_dir
    config_file = home / "coordinator.toml"
    if config_file.is_file() and (home / "coordinator.key").is_file():
        return Provisioned(node, home, config_file, "", created=False)
    password = secrets.token_urlsafe(24)
    values = {
        **_account(settings, home, node, password),
        "signing_key": _installed(settings, home, home / "coordinator.key"),
        "device_keys_dir": _installed(settings, home, home / "device-keys"),
        "require_signatures": True,
    }
    text = render(values)  # validates the settings before any secret is written
    key = generate_private_key()
    write_private_key(home / "coordinator.key", key)
    write_public_key(home / "coordinator.pub", key.public_key())
    (home / "device-keys").mkdir(parents=True, exist_ok=True)
    tool = set_password(
        settings.mosquitto_dir / "passwd", node, password, use_mosquitto_passwd=settings.use_mosquitto_passwd
    )
    _write_config(config_file, text)
    return Provisioned(node, home, config_file, tool)


def provision_device(settings: ProvisionSettings, node_id: str, render: RenderConfig) -> Provisioned:
    """A device's account, ACL entry, signing key and client config (the coordinator's first, if new)."""
    node = check_device_id(settings, node_id)
    home = settings.device_dir(node)
    config_file = home / "client.toml"
    coordinator_pub = settings.coordinator_dir / "coordinator.pub"
    if not coordinator_pub.is_file():
        raise ConfigError(f"{coordinator_pub} is missing: provision the coordinator first")
    password = secrets.token_urlsafe(24)
    values = {
        **_account(settings, home, node, password),
        "signing_key": _installed(settings, home, home / "signing.key"),
        "coordinator_public_key": _installed(settings, home, home / "coordinator.pub"),
    }
    text = render(values)  # validates the settings before any secret is written
    key = generate_private_key()
    write_private_key(home / "signing.key", key)
    write_public_key(settings.coordinator_dir / "device-keys" / f"{node}.pub", key.public_key())
    shutil.copyfile(coordinator_pub, home / "coordinator.pub")
    tool = set_password(
        settings.mosquitto_dir / "passwd", node, password, use_mosquitto_passwd=settings.use_mosquitto_passwd
    )
    add_device_to_acl(settings.mosquitto_dir / "acl", node, settings.coordinator_id)
    _write_config(config_file, text)
    return Provisioned(node, home, config_file, tool)


def check_device_id(settings: ProvisionSettings, node_id: str) -> str:
    """A device id that can be provisioned (check them all before writing anything)."""
    node = _check(node_id, "node id")
    if node == settings.coordinator_id:
        raise ConfigError(f"{node!r} is the coordinator's id; give the device another node id")
    config_file = settings.device_dir(node) / "client.toml"
    if config_file.exists() and not settings.force:
        raise ConfigError(
            f"{node} is already provisioned ({config_file}); pass --force to replace its password and keys"
        )
    return node


def _check(value: str, what: str) -> str:
    try:  # the ids a config may hold (flora/settings.py): a provisioned device must be able to load its own config
        return check_safe_id(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _account(settings: ProvisionSettings, home: Path, node: str, password: str) -> dict[str, str]:
    """The settings every node's config has: identity, run, broker, its account (username = node id), TLS."""
    return {
        "node_id": node,
        "run_id": settings.run_id,
        "broker_url": settings.broker_url,
        "username": node,
        "password": password,
        **_tls(settings, home, node),
    }


def _installed(settings: ProvisionSettings, home: Path, path: Path) -> str:
    """Where `path` (a file under `home`) will be once `home` is copied to install_dir."""
    if settings.install_dir is None:
        return str(path.resolve())
    return str(settings.install_dir / path.relative_to(home))


def _tls(settings: ProvisionSettings, home: Path, node: str) -> dict[str, str]:
    """Copy the CA (and the node's client certificate, when make-certs.sh made one) next to its config."""
    if settings.certs_dir is None:
        return {}
    certs = Path(settings.certs_dir)
    if not (certs / "ca.crt").is_file():
        raise ConfigError(f"{certs}/ca.crt is missing: run deploy/mosquitto/make-certs.sh {certs} BROKER_HOST first")
    tls = home / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(certs / "ca.crt", tls / "ca.crt")
    found = {"ca_file": _installed(settings, home, tls / "ca.crt")}
    if (certs / f"{node}.crt").is_file() and (certs / f"{node}.key").is_file():
        shutil.copyfile(certs / f"{node}.crt", tls / "client.crt")
        atomic_write_bytes(tls / "client.key", (certs / f"{node}.key").read_bytes())  # mode 0600
        found["cert_file"] = _installed(settings, home, tls / "client.crt")
        found["key_file"] = _installed(settings, home, tls / "client.key")
    return found


def _write_config(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))  # mode 0600: it holds the broker password
    os.chmod(path, 0o600)
