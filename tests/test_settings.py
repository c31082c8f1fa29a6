"""Settings every node shares (NodeSettings), and the log level a config sets taking effect."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from coordinator.config import CoordinatorConfig
from edge_client.config import ClientConfig
from flora.config import from_mapping
from flora.errors import ConfigError
from flora.settings import NodeSettings

CLIENT = {"node_id": "jetson-1", "model": "m", "data_dir": "/data"}
COORDINATOR = {"model": "m"}


def test_both_roles_declare_the_broker_and_wire_settings_once():
    shared = {f.name: f for f in dataclasses.fields(NodeSettings)}
    for role in (ClientConfig, CoordinatorConfig):
        own = {f.name: f for f in dataclasses.fields(role)}
        assert set(shared) <= set(own)
        # Same declaration (help text and default), not a copy that can drift; node_id may default per role.
        for name in set(shared) - {"node_id"}:
            assert own[name].metadata["help"] == shared[name].metadata["help"], name
            assert own[name].default == shared[name].default, name
    assert {"broker_url", "ca_file", "max_message_bytes", "wire_encoding", "log_level"} <= set(shared)


@pytest.mark.parametrize(("cls", "base"), [(ClientConfig, CLIENT), (CoordinatorConfig, COORDINATOR)])
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("wire_encoding", "float64", "wire_encoding must be one of"),
        ("log_level", "LOUD", "log_level must be one of DEBUG, INFO, WARNING, ERROR"),
        ("run_id", "a/b", "run_id"),
    ],
)
def test_shared_settings_are_validated_the_same_way_for_both_roles(cls, base, key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(cls, {**base, key: value})


def test_log_level_is_case_insensitive_and_maps_to_logging():
    config = from_mapping(ClientConfig, {**CLIENT, "log_level": "debug"})
    assert config.log_level == "DEBUG" and config.logging_level == logging.DEBUG


def test_the_configs_log_level_takes_effect_after_the_startup_default():
    from flora.app import cli

    root = logging.getLogger()
    saved_level, saved_handlers, saved_ours = root.level, list(root.handlers), cli._log_handler
    cli._log_handler = None  # as in a fresh process (another test may have run main() in this one)
    try:
        cli._setup_logging("INFO")  # what main() does before any config is read
        cli._setup_logging(logging.WARNING)  # the config's log_level, read afterwards
        assert root.level == logging.WARNING
        cli._setup_logging(logging.DEBUG)
        assert root.level == logging.DEBUG
        assert sum(h is cli._log_handler for h in root.handlers) == 1  # re-levelled, not stacked
        # bitsandbytes' offline kernel warning stays quiet whatever the config's level (it was reset to WARNING)
        assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
    finally:
        if cli._log_handler is not None:
            root.removeHandler(cli._log_handler)
        cli._log_handler = saved_ours
        root.setLevel(saved_level)
    assert root.handlers == saved_handlers


@pytest.mark.parametrize(("cls", "base"), [(ClientConfig, CLIENT), (CoordinatorConfig, COORDINATOR)])
@pytest.mark.parametrize("key", ["node_id", "run_id"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("site.jetson-1", "RabbitMQ's MQTT plugin maps '.' to a topic level separator"),
        ("jetson:1", "outside the characters every broker maps to a topic level unchanged"),
        ("jetsón", "outside the characters"),
    ],
)
def test_ids_a_broker_would_rewrite_are_refused_at_load_with_the_reason(cls, base, key, value, reason):
    # A '.' passes the wire's id rule, but RabbitMQ turns it into a second topic level: the node is never seen.
    with pytest.raises(ConfigError, match=reason) as refused:
        from_mapping(cls, {**base, key: value})
    assert key in str(refused.value) and "letters, digits, '_' and '-'" in str(refused.value)
