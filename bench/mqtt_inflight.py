"""Deliveries in flight to a busy receiver: MQTT 3.1.1 (the broker's window) against MQTT 5's Receive Maximum.

    .venv/bin/python bench/mqtt_inflight.py > mqtt_inflight.json

One fresh Mosquitto on a free loopback port per configuration. A receiver (MqttTransport, persistent session)
subscribes and takes nothing; `--messages` publishers each send one QoS 1 message of `--payload` bytes at once
and wait for their PUBACK. Reported: the most messages the receiver held unacknowledged (its inbox: a QoS 1
message is acknowledged only when taken), once the count stopped growing. The 3.1.1 socket pause is set out of
reach (a 1 GB inbox) so that only the protocol bounds what arrives; issue 11 measured 20 of 30 against 2 of 30.
Prints one JSON object on stdout: each configuration's figure and its ratio to MQTT 3.1.1's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the broker launcher


def in_flight(mqtt_version: str, receive_maximum: int | None, messages: int, payload: int) -> int:
    from flora.transport.mqtt import MqttTransport
    from tests.brokers import mosquitto_broker
    from tests.integration.test_mqtt5 import _publish_all, _settled_inbox

    with mosquitto_broker() as broker:
        receiver = MqttTransport(
            broker.url,
            "receiver",
            clean_session=False,
            max_inbox_bytes=10**9,
            mqtt_version=mqtt_version,
            receive_maximum=receive_maximum,
        )
        receiver.connect()
        receiver.subscribe("burst/#")
        try:
            _publish_all(broker.url, messages, payload)
            return max(_settled_inbox(receiver))
        finally:
            receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--payload", type=int, default=10_000)
    args = parser.parse_args()
    configs = {"mqtt311": ("3.1.1", None), "mqtt5_receive_maximum_2": ("5", 2), "mqtt5_receive_maximum_10": ("5", 10)}
    results = {name: in_flight(version, rm, args.messages, args.payload) for name, (version, rm) in configs.items()}
    base = results["mqtt311"]
    print(
        json.dumps(
            {
                "messages": args.messages,
                "payload_bytes": args.payload,
                "max_unacknowledged": results,
                "ratio_to_mqtt311": {name: round(value / base, 3) for name, value in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
