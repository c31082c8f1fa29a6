"""`flora doctor --config FILE`: check a node's setup before a run, one line per check with the fix.

What a run would otherwise find minutes in, or only after the model has loaded: the config, the files it
names, the directories it writes, the broker (reachable, TLS, credentials), the broker's ACL for the
role's own topics, the data, and the model. Exits 1 when a check fails, so an installer or a CI job can
stop on it.

The ACL probe connects as the node itself over MQTT 5, whose acknowledgements carry the broker's verdict
(3.1.1 brokers drop a forbidden publish silently). It resumes the node's session rather than starting a
clean one, so updates the broker queued for the node are kept, and it publishes only empty, non-retained
messages, which every role ignores. A running node with the same id is disconnected once and reconnects:
run the doctor before starting the service.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

from flora.errors import FloraError
from flora.protocol import Topics

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclasses.dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"[{self.status:>4}] {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def role_of(path: Path) -> str:
    """client when the file names a data_dir (a device's config), else coordinator."""
    try:
        keys = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "client"  # the loader reports the real problem
    return "client" if "data_dir" in keys else "coordinator"


def run_checks(path: Path, *, role: str | None = None, check_model: bool = True) -> Iterator[Check]:
    """Every check, in order; later checks are skipped when what they need failed."""
    role = role or role_of(path)
    try:
        config = _load(role, path)
    except FloraError as exc:
        yield Check("config", FAIL, str(exc), f"fix the setting it names (`flora {role} --help-config`)")
        return
    yield Check("config", OK, f"{path} is a valid {role} config (node {config.node_id}, run {config.run_id})")
    yield from _files(role, config)
    yield from _writable_dirs(role, config)
    reachable = _broker_reachable(config)
    yield reachable
    if reachable.status == OK:
        yield from _broker_session(role, config)
    yield from _data(role, config)
    if check_model:
        yield _model(role, config)


def _load(role: str, path: Path):
    if role == "client":
        from edge_client.config import load_client_config

        return load_client_config(path)
    from coordinator.config import load_coordinator_config

    return load_coordinator_config(path)


def _files(role: str, config) -> Iterator[Check]:
    named = {"ca_file": config.ca_file, "cert_file": config.cert_file, "key_file": config.key_file}
    named["signing_key"] = config.signing_key
    if role == "client":
        named["coordinator_public_key"] = config.coordinator_public_key
    else:
        named["device_keys_dir"] = config.device_keys_dir
    for setting, value in named.items():
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            yield Check(setting, FAIL, f"{path} does not exist", f"copy it there, or correct {setting}")
        elif not os.access(path, os.R_OK):
            yield Check(setting, FAIL, f"{path} is not readable by this user", "fix its owner or mode (0640)")
        else:
            yield Check(setting, OK, str(path))
    if config.broker_url.startswith("mqtts://") and config.ca_file is None:
        yield Check("ca_file", WARN, "not set: the broker's certificate must chain to the system's CA store")


def _writable_dirs(role: str, config) -> Iterator[Check]:
    dirs = {"state_dir": config.state_dir} if role == "client" else {"checkpoint_dir": config.checkpoint_dir}
    if role == "coordinator" and config.output_dir != config.checkpoint_dir:
        dirs["output_dir"] = config.output_dir
    for setting, directory in dirs.items():
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".flora-doctor-"):
                pass
        except OSError as exc:
            fix = f"create it writable by this user (the service runs as `flora`), or change {setting}"
            yield Check(setting, FAIL, f"{directory} is not writable ({exc.strerror})", fix)
        else:
            yield Check(setting, OK, f"{directory} is writable")


def _broker_reachable(config) -> Check:
    from flora.transport.base import TransportError, redact_url
    from flora.transport.mqtt import parse_broker_url

    shown = redact_url(config.broker_url)
    try:
        _, host, port, _, _ = parse_broker_url(config.broker_url)
        with socket.create_connection((host, port), timeout=5):
            pass
    except TransportError as exc:
        return Check("broker", FAIL, str(exc), "correct broker_url")
    except OSError as exc:
        fix = "start the broker, or open the port in its host's and the network's firewalls"
        return Check("broker", FAIL, f"{shown} is not reachable ({exc})", fix)
    return Check("broker", OK, f"{shown} accepts connections")


def _broker_session(role: str, config) -> Iterator[Check]:
    """Connect as the node (TLS, credentials), then ask the broker's ACL about the role's own topics."""
    probe = _AclProbe(config)
    problem = probe.connect()
    if problem is not None:
        yield Check("broker login", FAIL, problem[0], problem[1])
        return
    yield Check("broker login", OK, f"connected as {probe.user or '(anonymous)'}" + (" over TLS" if probe.tls else ""))
    topics = Topics(config.run_id)
    node = config.node_id
    if role == "client":
        publish = [topics.status(node), topics.update(node)]
        subscribe = [topics.instruction, topics.metrics]
    else:
        publish = [topics.instruction, topics.metrics, topics.status(node)]
        subscribe = [topics.all_status, topics.all_updates]
    try:
        for topic, refused in probe.publish_rights(publish).items():
            yield _acl_check("publish", topic, refused)
        for topic, refused in probe.subscribe_rights(subscribe).items():
            if refused is not None:
                yield _acl_check("subscribe", topic, refused)
            elif probe.received_on(topic):
                yield Check("ACL read", OK, f"{topic} (a retained message was delivered)")
            else:
                # Mosquitto grants every subscription and applies the ACL when it delivers a message, so read
                # access shows only once something is published there (the first instruction, a round result).
                yield Check(
                    "ACL read",
                    WARN,
                    f"{topic}: subscription accepted; nothing retained there yet, so read access cannot be confirmed",
                    "if the node never receives instructions, check its `topic read` lines in the broker's acl file",
                )
    finally:
        probe.close()


def _acl_check(action: str, topic: str, refused: str | None) -> Check:
    if refused is None:
        return Check(f"ACL {action}", OK, topic)
    fix = "add the node's block to the broker's acl file (`flora provision`), then reload mosquitto"
    return Check(f"ACL {action}", FAIL, f"{topic}: refused by the broker ({refused})", fix)


class _AclProbe:
    """A paho MQTT 5 client as the node, whose PUBACK and SUBACK reason codes say what the ACL allows."""

    TIMEOUT_S = 10.0
    RETAINED_WAIT_S = 1.0

    def __init__(self, config):
        from flora.transport.mqtt import parse_broker_url

        scheme, self.host, self.port, url_user, url_password = parse_broker_url(config.broker_url)
        self.user = config.username or url_user
        self.password = config.password or url_password
        self.tls = scheme == "mqtts"
        self.config = config
        self.client: Any = None
        self._acks: dict[int, str | None] = {}
        self._received: set[str] = set()  # topics a message arrived on (retained, after a subscription)
        self._done = threading.Condition()

    def connect(self) -> tuple[str, str] | None:
        """None when connected, else (what happened, the fix)."""
        import ssl

        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.config.node_id, protocol=mqtt.MQTTv5)
        if self.user:
            client.username_pw_set(self.user, self.password)
        if self.tls:
            try:
                client.tls_set(
                    ca_certs=self.config.ca_file,
                    certfile=self.config.cert_file,
                    keyfile=self.config.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                return f"the TLS files cannot be used ({exc})", "check ca_file, cert_file and key_file"
        client.on_publish = lambda _c, _u, mid, reason, _p: self._ack(mid, reason)
        client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._ack(mid, next((r for r in reasons), None))
        client.on_message = lambda _c, _u, message: self._on_message(message)
        keep = Properties(PacketTypes.CONNECT)
        keep.SessionExpiryInterval = 0xFFFFFFFF  # resume and keep the node's session: queued messages survive
        try:
            result = client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=keep)
        except ssl.SSLCertVerificationError as exc:
            fix = "set ca_file to the CA that signed the broker's certificate (make-certs.sh: ca.crt)"
            return f"TLS verification failed: {exc.verify_message or exc}", fix
        except (OSError, ssl.SSLError) as exc:
            return f"TLS or connection failed: {exc}", "check the broker's TLS listener and ca_file"
        connected = threading.Event()
        outcome: list[Any] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: (outcome.append(reason), connected.set())
        client.loop_start()
        self.client = client
        if result != mqtt.MQTT_ERR_SUCCESS or not connected.wait(self.TIMEOUT_S):
            return "no answer to CONNECT", "check that broker_url names an MQTT listener"
        if outcome[0].is_failure:
            return (
                f"the broker refused {self.user or 'an anonymous client'}: {outcome[0]}",
                "check username and password (`flora provision NODE --force` makes new ones)",
            )
        return None

    def _ack(self, mid: int, reason: Any) -> None:
        with self._done:
            self._acks[mid] = str(reason) if reason is not None and reason.is_failure else None
            self._done.notify_all()

    def _wait(self, mids: dict[str, int]) -> dict[str, str | None]:
        with self._done:
            self._done.wait_for(lambda: all(m in self._acks for m in mids.values()), timeout=self.TIMEOUT_S)
            return {topic: self._acks.get(mid, "no acknowledgement") for topic, mid in mids.items()}

    def publish_rights(self, topics: list[str]) -> dict[str, str | None]:
        # Empty and not retained: every role ignores an empty payload, and nothing stays on the broker.
        return self._wait({t: self.client.publish(t, b"", qos=1, retain=False).mid for t in topics})

    def subscribe_rights(self, topics: list[str]) -> dict[str, str | None]:
        # The role's own subscriptions, which a resumed session has already: leaving them in place changes nothing.
        rights = self._wait({t: self.client.subscribe(t, qos=1)[1] for t in topics})
        with self._done:  # retained messages follow the SUBACK; give them a moment to arrive
            self._done.wait_for(lambda: all(self.received_on(t) for t in topics), timeout=self.RETAINED_WAIT_S)
        return rights

    def received_on(self, topic_filter: str) -> bool:
        import paho.mqtt.client as mqtt

        return any(mqtt.topic_matches_sub(topic_filter, topic) for topic in self._received)

    def _on_message(self, message: Any) -> None:
        with self._done:
            self._received.add(message.topic)
            self._done.notify_all()

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def _data(role: str, config) -> Iterator[Check]:
    from flora.data.datasets import load_image_folder
    from flora.data.formats import load_local_data

    where = config.data_dir if role == "client" else config.eval_data_dir
    if where is None:
        yield Check("eval data", WARN, "eval_data_dir is not set: rounds will not be evaluated")
        return
    name = "data" if role == "client" else "eval data"
    try:
        data = load_local_data(where, config.data_format) if role == "client" else load_image_folder(where)
    except FloraError as exc:
        yield Check(name, FAIL, str(exc), "fix the data directory, or correct data_dir / data_format")
        return
    classes = len(data.class_names) if getattr(data, "class_names", None) else "?"
    detail = f"{len(data)} examples, {classes} classes in {where}"
    if data.skipped:
        yield Check(name, WARN, f"{detail}; {data.skipped} unreadable files skipped", "remove or re-encode them")
    else:
        yield Check(name, OK, detail)


def _model(role: str, config) -> Check:
    try:
        if role == "client":
            from edge_client.quantization import load_for_training

            loaded = load_for_training(config)
        else:
            from flora.modeling.loading import load_model

            loaded = load_model(config.model, device=config.device)
    except FloraError as exc:
        return Check("model", FAIL, str(exc), "correct model, or install the checkpoint where it points")
    except (OSError, ImportError, RuntimeError, ValueError) as exc:
        return Check("model", FAIL, f"{config.model} cannot be loaded: {exc}", "see docs/EDGE.md §Troubleshooting")
    quantized = getattr(loaded, "quantization", "none")
    return Check("model", OK, f"{config.model} loads ({loaded.family.name}, quantization {quantized}, {loaded.device})")


def print_report(checks: Iterator[Check], echo: Callable[[str], None] = print) -> int:
    failed = 0
    for check in checks:
        echo(check.line())
        failed += check.status == FAIL
    echo(f"{failed} problem(s) found" if failed else "all checks passed")
    return 1 if failed else 0
