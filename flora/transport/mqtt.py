"""MQTT transport on paho-mqtt 2.x (callback API version 2): MQTT 3.1.1 (the default, for broad broker
support) or MQTT 5 (`mqtt_version="5"`).

Reconnects by itself with exponential backoff (paho's loop thread) and re-subscribes on every
connect. A persistent session (`clean_session=False`; under MQTT 5, clean_start=False with a session expiry
interval) makes the broker queue QoS 1 messages for us while we are away: the coordinator uses it so updates
sent during a restart survive. A publish waits through an outage of any length (see publish).

Flow control: messages wait in the broker, not in this process. A QoS 1 message is acknowledged only
when the role takes it. Under MQTT 5 that is all it takes: the CONNECT's Receive Maximum caps the
unacknowledged deliveries the broker may have out to us, so the inbox holds at most that many messages.
MQTT 3.1.1 has no such cap, so there (the fallback) the network thread stops reading the socket while the
inbox holds more than `max_inbox_bytes` (TCP then pushes back on the broker, which queues for us), except
while a publish of ours awaits its PUBACK and while (re)connecting. Mosquitto's in-flight window alone does not do this:
measured with 200 concurrent publishers and a consuming subscriber, it let 184 unacknowledged 100 KB
messages through (bench/coordinator_scale.py saw 422 of 500). The broker must then be allowed to queue
enough per client (Mosquitto: max_queued_messages; see deploy/mosquitto/mosquitto.conf).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flora.protocol.chunking import mqtt_publish_packet_size
from flora.transport.base import RECONNECTED, Message, Transport, TransportError, redact_url

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_MAX_INBOX_BYTES = 4 * 1024 * 1024  # ~40 paper-recipe updates (102 KB); a bigger message still gets in
MQTT_VERSIONS = ("3.1.1", "5")
SESSION_EXPIRY_S = 0xFFFFFFFF  # MQTT 5: "never expires", as a 3.1.1 persistent session (clean_session=False)
DEFAULT_RECEIVE_MAXIMUM_MESSAGE_BYTES = 120_000  # to turn max_inbox_bytes into a message count without a limit
# paho's reconnect backoff doubles from 1 s up to this: after an outage the fleet is back within ~10 s of the
# broker (at 30 s, a 45 s outage cost a minute), and 500 devices retrying every 10 s are no load for a broker.
RECONNECT_MAX_DELAY_S = 10
PUBLISH_WAIT_LOG_S = 10.0  # a publish waiting through an outage says so this often
PAUSED_WAKEUP_S = 0.05  # while reading is paused, the network thread still wakes this often (pings, writes)


def parse_broker_url(url: str) -> tuple[str, str, int, str | None, str | None]:
    """mqtt://[user[:password]@]host[:port] -> (scheme, host, port, user, password)."""
    parsed = urlparse(url)
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
        raise TransportError(f"broker URL {redact_url(url)!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    except ValueError:
        raise TransportError(f"broker URL {redact_url(url)!r} has an invalid port") from None
    user = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return parsed.scheme, parsed.hostname, port, user, password


class _PausableClient(mqtt.Client):
    """paho Client whose network thread skips reading while `may_read()` is false.

    paho's loop calls loop_read() whenever select() reports the socket readable; returning without reading
    leaves the bytes in the kernel's buffer, and once that fills, TCP stops the broker's sends. The wait
    keeps the loop from spinning on a socket that stays readable; `wake` cuts it short.

    Two of paho's private fields are touched (pinned: paho-mqtt>=2,<3), for keepalive: paho declares the
    broker dead when no PINGRESP is read within `keepalive` of a PINGREQ, but the PINGRESP sits behind
    everything the broker already sent, so waiting for it would mean reading the whole backlog. Bytes
    waiting unread prove the broker alive just as well, so while paused the ping is marked answered.
    """

    def __init__(self, *args, may_read: Callable[[], bool], wake: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self._may_read = may_read
        self._wake = wake

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        # Only a connected session pauses: during a (re)connect the CONNACK must be read.
        if self._sock is None or not self.is_connected() or self._may_read() or self._at_eof():
            return super().loop_read(max_packets)
        self._ping_t = 0
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()  # paho's clock (time_func) is time.monotonic
        self._wake.wait(PAUSED_WAKEUP_S)
        self._wake.clear()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _at_eof(self) -> bool:
        """A readable plain socket with nothing to read is a closed connection: let paho read it and
        reconnect. (TLS sockets cannot peek; there a dropped broker is noticed once reading resumes.)"""
        if isinstance(self._sock, ssl.SSLSocket) or not isinstance(self._sock, socket.socket):
            return False
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # reset or similar: paho's own read reports it


class MqttTransport(Transport):
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = 30,
        max_message_bytes: int | None = None,
        max_inbox_bytes: int = DEFAULT_MAX_INBOX_BYTES,
        mqtt_version: str = "3.1.1",
        receive_maximum: int | None = None,
    ):
        if mqtt_version not in MQTT_VERSIONS:
            raise TransportError(f"mqtt_version must be one of {', '.join(MQTT_VERSIONS)}, got {mqtt_version!r}")
        scheme, self.host, self.port, url_user, url_password = parse_broker_url(url)
        self.mqtt_version = mqtt_version
        self.clean_session = clean_session
        # MQTT 5: the inbox bound as a message count (each message at most one max_message_bytes packet).
        per_message = max_message_bytes or DEFAULT_RECEIVE_MAXIMUM_MESSAGE_BYTES
        self.receive_maximum = receive_maximum or max(1, min(65535, max_inbox_bytes // per_message))
        self.url = redact_url(url)  # what logs and errors show: never the password
        self.client_id = client_id
        self.max_message_bytes = max_message_bytes
        self.keepalive = keepalive
        self._filters: dict[str, int] = {}
        # (message, mid): a QoS 1 message is acknowledged only when the role's thread takes it (see receive).
        self._inbox: queue.Queue[tuple[Message, int | None]] = queue.Queue()
        self.max_inbox_bytes = max_inbox_bytes
        self._inbox_bytes = 0  # payload bytes in the inbox; guarded by _lock
        self._awaiting_acks = 0  # publishes waiting for the broker's PUBACK, which must be read; guarded by _lock
        self._wake_reader = threading.Event()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._ever_connected = False
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

        if mqtt_version == "5":  # session persistence is a connect option under MQTT 5 (see connect)
            session = {"protocol": mqtt.MQTTv5}
        else:
            session = {"protocol": mqtt.MQTTv311, "clean_session": clean_session}
        self._client = _PausableClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            may_read=self._may_read,
            wake=self._wake_reader,
            **session,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_DELAY_S)
        self._client.manual_ack_set(True)  # acknowledged in receive(): see there
        # Queue outgoing QoS 1 messages while disconnected rather than failing at once.
        self._client.max_queued_messages_set(0)
        user = username or url_user
        if user:
            self._client.username_pw_set(user, password or url_password)
        if scheme == "mqtts":
            self._client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread: keep them short) --------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker %s:%s refused %s: %s", self.host, self.port, self.client_id, reason_code)
            return
        self._refused = None
        with self._lock:
            filters = list(self._filters.items())
        for topic_filter, qos in filters:
            client.subscribe(topic_filter, qos)
        self._connected.set()
        if self._ever_connected:
            log.info("%s reconnected to %s:%s", self.client_id, self.host, self.port)
            self._inbox.put((Message(RECONNECTED, b"", qos=0), None))
        self._ever_connected = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self._connected.is_set()
        self._connected.clear()
        if was and reason_code != 0:
            log.warning("%s lost the broker (%s); reconnecting with backoff", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg):
        self.bytes_received += len(msg.payload)
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        with self._lock:
            self._inbox_bytes += len(message.payload)
        self._inbox.put((message, msg.mid if msg.qos else None))

    def _may_read(self) -> bool:
        """Read on while the inbox has room, and always while one of our publishes awaits its PUBACK
        (it is behind whatever the broker sent before it; not reading would deadlock publish()).
        Under MQTT 5 always: Receive Maximum bounds what the broker sends, and paho's private fields stay
        untouched."""
        if self.mqtt_version == "5":
            return True
        with self._lock:
            return self._inbox_bytes < self.max_inbox_bytes or self._awaiting_acks > 0

    # -- Transport ------------------------------------------------------------------------
    def connect(self, *, will: Message | None = None, timeout: float = 30.0) -> None:
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self._client.connect(self.host, self.port, keepalive=self.keepalive, **self._connect_options())
                break
            except ssl.SSLCertVerificationError as exc:  # retrying cannot make an untrusted certificate trusted
                _close_sockets_left_in(exc.__traceback__)
                raise TransportError(
                    f"TLS verification of broker {self.url} failed: {exc.verify_message or exc}. Set ca_file to the "
                    "CA that signed the broker's certificate, and use a host name that certificate names"
                ) from None
            except (OSError, ssl.SSLError) as exc:
                _close_sockets_left_in(exc.__traceback__)
                if time.monotonic() + delay > deadline:
                    raise TransportError(
                        f"cannot reach broker {self.url} after {timeout:.0f}s: {exc}. "
                        "Is the broker running and the URL right?"
                    ) from None
                log.info("broker %s not reachable (%s); retrying in %.1fs", self.url, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self._client.loop_start()
        while not self._connected.wait(0.1):
            if self._refused is not None:
                self.close()
                raise TransportError(
                    f"broker {self.url} refused client {self.client_id!r}: {self._refused}. "
                    "Check the username, password and ACL for this device."
                )
            if time.monotonic() > deadline:
                self.close()
                raise TransportError(f"no CONNACK from {self.url} within {timeout:.0f}s")

    def _connect_options(self) -> dict:
        """MQTT 5's CONNECT: clean_start and a session expiry interval where 3.1.1 has clean_session, and the
        Receive Maximum that bounds in-flight deliveries. paho keeps both for its reconnects."""
        if self.mqtt_version != "5":
            return {}
        properties = Properties(PacketTypes.CONNECT)
        properties.ReceiveMaximum = self.receive_maximum
        if not self.clean_session:
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        return {"clean_start": self.clean_session, "properties": properties}

    @property
    def inbox_messages(self) -> int:
        """Messages received but not yet taken by receive() (each QoS 1 one is still unacknowledged)."""
        return self._inbox.qsize()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        with self._lock:
            self._filters[topic_filter] = qos
        if self._connected.is_set():
            result, _ = self._client.subscribe(topic_filter, qos)
            # Dropped since the check (a broker restart, or a second device with our client id taking the session):
            # the filter is kept above and sent again on the reconnect, as every filter is.
            if result not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise TransportError(f"subscribe to {topic_filter!r} failed: {mqtt.error_string(result)}")

    def publish(self, message: Message, *, timeout: float | None = None) -> None:
        """Send; for QoS 1 return once the broker acknowledged it. Through an outage of any length this waits for
        paho's reconnect (logging how long, every PUBLISH_WAIT_LOG_S) unless `timeout` seconds are given: a node
        that exits because the broker restarts slowly needs a supervisor to come back, one that waits does not.
        Memory stays bounded: the caller is blocked, so at most this one message waits."""
        size = len(message.payload)
        packet = mqtt_publish_packet_size(message.topic, size, message.qos)
        if self.max_message_bytes is not None and packet > self.max_message_bytes:
            # paho does not enforce the broker's limit: the broker drops the connection on an oversize
            # packet, paho reconnects and resends the QoS 1 message, forever. Refuse it here instead.
            raise TransportError(
                f"message on {message.topic} is a {packet}-byte MQTT packet ({size} bytes of payload), over the "
                f"{self.max_message_bytes}-byte max_message_bytes configured for this broker; send it through "
                "flora.transport.transport_for (which chunks it) or raise max_message_bytes to the broker's limit"
            )
        wait = _PublishWait(self, message.topic, size, timeout)
        while True:
            # Through a broker restart or network blip: wait for paho's reconnect rather than fail at once.
            wait.until_connected()
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            self._wake_reader.set()  # a paused network thread writes it now, not after its wait
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise TransportError(f"publish to {message.topic} failed: {mqtt.error_string(info.rc)}")
            if message.qos == 0 or self._wait_for_ack(info, wait):
                break
            # The connection dropped before the broker's acknowledgement: publish again once reconnected.
            # A duplicate is harmless: every receiver is idempotent under QoS 1's at-least-once delivery.
        wait.done()
        self.bytes_sent += size

    def _wait_for_ack(self, info, wait: _PublishWait) -> bool:
        """True once acknowledged; False if the connection dropped first (publish then sends it again)."""
        with self._lock:
            self._awaiting_acks += 1
        self._wake_reader.set()
        try:
            while True:
                try:
                    if info.is_published():
                        return True
                except RuntimeError:
                    return False
                if not self._connected.is_set():
                    return False  # paho keeps it for the session too; a duplicate is harmless (see publish)
                wait.check_ack()
                time.sleep(0.01)
        finally:
            with self._lock:
                self._awaiting_acks -= 1

    def receive(self, timeout: float | None = None) -> Message | None:
        try:
            message, mid = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._inbox_bytes -= len(message.payload)
        self._wake_reader.set()
        if mid is not None:
            # Acknowledged now, not on arrival: a crash before the role took it means redelivery, not loss.
            self._client.ack(mid, message.qos)
        return message

    @property
    def inbox_bytes(self) -> int:
        """Payload bytes received but not yet taken by receive(). Bounded by max_inbox_bytes plus one read,
        except while a publish of ours awaits its PUBACK: reading then goes on until that arrives."""
        with self._lock:
            return self._inbox_bytes

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()


class _PublishWait:
    """How long one publish has waited for the broker: raises past an explicit timeout, otherwise logs progress."""

    def __init__(self, transport: MqttTransport, topic: str, size: int, timeout: float | None):
        self.transport, self.topic, self.size, self.timeout = transport, topic, size, timeout
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.next_log = self.started + PUBLISH_WAIT_LOG_S
        self.logged = False

    def until_connected(self) -> None:
        connected = self.transport._connected
        while not connected.wait(self._slice()):
            if self.deadline is not None and time.monotonic() >= self.deadline:
                url = self.transport.url
                raise TransportError(
                    f"broker {url} unreachable for {self.timeout:.0f}s; could not publish on {self.topic}"
                )
            self._progress("unreachable")

    def check_ack(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TransportError(f"broker did not acknowledge {self.topic} within {self.timeout:.0f}s")
        self._progress("has not acknowledged")

    def done(self) -> None:
        if self.logged:
            log.info(
                "published on %s after waiting %.0f s for broker %s", self.topic, self._waited(), self.transport.url
            )

    def _slice(self) -> float:
        now = time.monotonic()
        ends = [self.next_log] + ([self.deadline] if self.deadline is not None else [])
        return max(0.01, min(ends) - now)

    def _waited(self) -> float:
        return time.monotonic() - self.started

    def _progress(self, what: str) -> None:
        if time.monotonic() < self.next_log:
            return
        self.next_log = time.monotonic() + PUBLISH_WAIT_LOG_S
        self.logged = True
        log.warning(
            "broker %s %s for %.0f s, waiting to publish on %s (%d bytes queued); it is retried until the broker "
            "is back",
            self.transport.url,
            what,
            self._waited(),
            self.topic,
            self.size,
        )


def _close_sockets_left_in(tb) -> None:
    """paho-mqtt 2.x does not close its socket when the TLS handshake fails; the socket is still referenced by
    the traceback's frames. Close it, or every failed attempt leaks a file descriptor (and a ResourceWarning)."""
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next
