"""A secured fleet on disk, made the way an operator makes one: deploy/mosquitto/make-certs.sh for TLS,
`flora provision` (its Python entry points) for accounts, ACL entries, keys and configs, and a real
Mosquitto started with deploy/mosquitto/mosquitto.conf."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from coordinator.config import CoordinatorConfig, load_coordinator_config
from edge_client.config import ClientConfig, load_client_config
from flora.app.provision import ProvisionSettings, provision_coordinator, provision_device, set_password
from flora.config import from_mapping, to_toml
from flora.transport.mqtt import MqttTransport
from tests.brokers import BrokerProcess, secured_mosquitto_broker

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_DIR = ROOT / "deploy" / "mosquitto"
MAKE_CERTS = MOSQUITTO_DIR / "make-certs.sh"
PROVISIONED_URL = "mqtts://127.0.0.1:8883"  # what the configs say; tests connect to the broker's real port


def make_certs(out: Path, *names: str, clients: tuple[str, ...] = ()) -> Path:
    args = ["bash", str(MAKE_CERTS), str(out), *names]
    for client in clients:
        args += ["--client", client]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


@dataclasses.dataclass
class Fleet:
    out: Path  # the provisioning directory
    certs: Path
    broker_files: Path  # what goes to /etc/mosquitto/flora/
    passwords: dict[str, str]

    def device_toml(self, node: str) -> Path:
        return self.out / "devices" / node / "client.toml"

    @property
    def coordinator_toml(self) -> Path:
        return self.out / "coordinator" / "coordinator.toml"

    def start_broker(self, **kwargs) -> BrokerProcess:
        return secured_mosquitto_broker(MOSQUITTO_DIR / "mosquitto.conf", self.broker_files, **kwargs).start()

    def transport(
        self, broker: BrokerProcess, user: str | None, *, client_id: str | None = None, host: str | None = None, **kw
    ) -> MqttTransport:
        kw.setdefault("password", self.passwords.get(user) if user else None)
        kw.setdefault("ca_file", str(self.certs / "ca.crt"))
        url = broker.url if host is None else f"mqtts://{host}:{broker.port}"
        return MqttTransport(url, client_id or user or "anonymous", username=user, **kw)


def provision_fleet(tmp: Path, devices: list[str], *, model: str = "m", admin: str | None = None) -> Fleet:
    """Certificates, then the coordinator and `devices` (the first through mosquitto_passwd, the others through
    the built-in hash, so both are proven against the broker). `admin`: an extra account that may do anything,
    standing in for whoever controls a compromised broker."""
    certs = make_certs(tmp / "certs", "localhost", "127.0.0.1", clients=tuple(devices[:1]))
    out = tmp / "provision"

    def render(cls, extra):
        return lambda values: to_toml(from_mapping(cls, {**values, **extra}))

    settings = ProvisionSettings(out=out, broker_url=PROVISIONED_URL, run_id="itest", install_dir=None, certs_dir=certs)
    provision_coordinator(settings, render(CoordinatorConfig, {"model": model}))
    client_render = render(ClientConfig, {"model": model, "data_dir": str(tmp)})
    for i, node in enumerate(devices):
        provision_device(dataclasses.replace(settings, use_mosquitto_passwd=i == 0), node, client_render)

    broker_files = out / "mosquitto"
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copyfile(certs / name, broker_files / name)
    # The configs load through the roles' own loaders, as `flora client --config` would read them.
    passwords = {"coordinator": load_coordinator_config(out / "coordinator" / "coordinator.toml").password}
    for node in devices:
        passwords[node] = load_client_config(out / "devices" / node / "client.toml").password
    if admin:
        passwords[admin] = "admin-" + admin
        set_password(broker_files / "passwd", admin, passwords[admin], use_mosquitto_passwd=False)
        with open(broker_files / "acl", "a") as acl:
            acl.write(f"\n# test only: the broker's operator, here the attacker\nuser {admin}\ntopic readwrite #\n")
    return Fleet(out, certs, broker_files, passwords)
