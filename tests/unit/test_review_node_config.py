"""Review of node.toml validation: values accepted that make the node misbehave."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.config import ConfigError, load_node_config
from tests.unit.test_config_keys import NODE, _write


def test_a_hub_address_on_port_0_is_refused(tmp_path: Path) -> None:
    """node.hub = "HOST:0" is accepted; the node then dials port 0 for ever (the case
    test_a_node_without_its_hub_address_is_refused mended for a missing key, written out)."""
    path = _write(tmp_path, NODE.replace('hub = "127.0.0.1:1"', 'hub = "127.0.0.1:0"', 1))
    with pytest.raises(ConfigError, match=re.escape("node.hub")):
        load_node_config(path)
