from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from edge_client.config import load_client_config
from flora.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_client_config_loads_file_and_env_overrides(tmp_path):
    path = write(tmp_path, 'node_id = "jetson-1"\nmodel = "m"\ndata_dir = "/data"\nbatch_size = 16\n')
    config = load_client_config(path)
    assert config.node_id == "jetson-1" and config.batch_size == 16 and config.data_dir == Path("/data")


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, 'node_id = "a"\nmodel = "m"\ndata_dir = "/d"\n')
    monkeypatch.setenv("FLORA_CLIENT_BROKER_URL", "mqtt://broker:1884")
    monkeypatch.setenv("FLORA_CLIENT_BATCH_SIZE", "8")
    config = load_client_config(path)
    assert config.broker_url == "mqtt://broker:1884" and config.batch_size == 8


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = write(tmp_path, 'node_id = "a"\nmodel = "m"\ndata_dir = "/d"\nbatch_sise = 4\n')
    with pytest.raises(ConfigError, match=r"'batch_sise' \(did you mean 'batch_size'\?\)"):
        load_client_config(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('quantization = "3bit"', "quantization must be one of none, 8bit, 4bit"),
        ("batch_size = 0", "batch_size must be >= 1"),
        ('batch_size = "many"', "setting 'batch_size'"),
        ('node_id = "a/b"', "node_id"),
        ('recipe = "nope"', "unknown recipe 'nope'"),
    ],
)
def test_bad_client_values_say_what_to_change(tmp_path, line, message):
    base = {"node_id": '"a"', "model": '"m"', "data_dir": '"/d"'}
    key = line.split(" = ")[0]
    base[key] = line.split(" = ", 1)[1]
    path = write(tmp_path, "\n".join(f"{k} = {v}" for k, v in base.items()))
    with pytest.raises(ConfigError, match=message):
        load_client_config(path)


def test_missing_required_setting_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load_client_config(write(tmp_path, 'node_id = "a"\ndata_dir = "/d"\n'))
    with pytest.raises(ConfigError, match="does not exist"):
        load_client_config(tmp_path / "absent.toml")


def test_invalid_toml_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_client_config(write(tmp_path, "node_id = \n"))


def test_coordinator_rejects_impossible_quorum(tmp_path):
    path = write(tmp_path, 'model = "m"\nquorum = 5\nmin_clients_per_round = 2\nmin_available_clients = 2\n')
    with pytest.raises(ConfigError, match="quorum cannot exceed"):
        load_coordinator_config(path)


def test_coordinator_output_dir_defaults_to_checkpoint_dir(tmp_path):
    config = load_coordinator_config(write(tmp_path, 'model = "m"\ncheckpoint_dir = "/ck"\n'))
    assert config.output_dir == Path("/ck")
