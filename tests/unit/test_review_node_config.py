"""Review of node.toml validation: values accepted that make the node misbehave."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.config import ConfigError, load_node_config
from tests.unit.test_config_keys import NODE, _write


@pytest.mark.parametrize("name", ["Phong", "phong vanthu", "phòng", "-phong"])
def test_a_client_name_no_certificate_can_carry_is_refused(tmp_path: Path, name: str) -> None:
    """[[clients]] limits the back-end whose certificate says urn:chapar:client:CODE:NAME;
    a name no identity can have (client names are [a-z0-9][a-z0-9.-]{0,63}) matches no
    certificate, so the limit never applies and the back-end meant (say "phong", typed
    "Phong") may use every mailbox. It is accepted without a word."""
    path = _write(tmp_path, NODE.replace('name = "backend"', f'name = "{name}"', 1))
    with pytest.raises(ConfigError, match=re.escape("clients[0].name")):
        load_node_config(path)


def test_a_hub_address_on_port_0_is_refused(tmp_path: Path) -> None:
    """node.hub = "HOST:0" is accepted; the node then dials port 0 for ever (the case
    test_a_node_without_its_hub_address_is_refused mended for a missing key, written out)."""
    path = _write(tmp_path, NODE.replace('hub = "127.0.0.1:1"', 'hub = "127.0.0.1:0"', 1))
    with pytest.raises(ConfigError, match=re.escape("node.hub")):
        load_node_config(path)
