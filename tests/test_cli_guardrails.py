"""Guardrails of the CLI: a missing extra is named, and a broker password never reaches a log or an error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flora.transport import connect_transport
from flora.transport.base import TransportError, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtts://observer:s3cret@broker.example:8883", "mqtts://observer:***@broker.example:8883"),
        ("mqtt://user:p%40ss:word@host:1883", "mqtt://user:***@host:1883"),
        ("mqtt://user@host:1883", "mqtt://user@host:1883"),
        ("mqtt://host:1883", "mqtt://host:1883"),
        ("not a url", "not a url"),
    ],
)
def test_a_password_in_a_broker_url_is_redacted(url, shown):
    assert redact_url(url) == shown


def test_connection_errors_never_show_the_password():
    transport = connect_transport("mqtt://observer:s3cret@127.0.0.1:9", "status-test")  # nothing listens on 9
    with pytest.raises(TransportError) as caught:
        transport.connect(timeout=1)
    assert "s3cret" not in str(caught.value) and "observer:***@127.0.0.1:9" in str(caught.value)
    transport.close()


def test_a_missing_dependency_names_the_extra_to_install(tmp_path, digits):
    from flora.data.datasets import write_image_folder

    data = write_image_folder(digits.subset(range(10)), tmp_path / "data")
    config = tmp_path / "client.toml"
    config.write_text(f'node_id = "jetson-1"\nmodel = "m"\ndata_dir = "{data}"\n')
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as on a device installed without the edge extra\n"
        "from flora.app.cli import main\n"
        f"sys.exit(main(['client', '--config', {str(config)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "'torch'" in result.stderr and 'pip install "flora-edge[edge]"' in result.stderr
