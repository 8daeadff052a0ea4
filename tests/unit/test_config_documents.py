"""The ``[documents]`` configuration of a node: defaults, and bad values named by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_node_config
from node.core.documents import DEFAULT_MAX_FILE_BYTES, DEFAULT_MEDIA_TYPES


def _config(tmp_path: Path, documents: str) -> Path:
    for name in ("ca.crt", "tls.crt", "tls.key", "signing.crt", "signing.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
agency = "000.00.00.G22"
hub = "127.0.0.1:7000"
{documents}
[tls]
ca = "ca.crt"
cert = "tls.crt"
key = "tls.key"
[signing]
cert = "signing.crt"
key = "signing.key"
"""
    )
    return path


def test_documents_defaults(tmp_path: Path) -> None:
    config = load_node_config(_config(tmp_path, ""))
    assert config.documents.max_file_bytes == DEFAULT_MAX_FILE_BYTES
    assert config.documents.media_types == DEFAULT_MEDIA_TYPES
    assert config.documents_dir == tmp_path / "documents"


def test_documents_settings_are_read(tmp_path: Path) -> None:
    config = load_node_config(
        _config(
            tmp_path,
            '[documents]\ndirectory = "/srv/docs"\nmax_file_bytes = 1000\n'
            'media_types = ["application/pdf"]\n',
        )
    )
    assert config.documents.max_file_bytes == 1000
    assert config.documents.media_types == frozenset({"application/pdf"})
    assert config.documents_dir == Path("/srv/docs")


@pytest.mark.parametrize(
    ("documents", "key"),
    [
        ("[documents]\nmax_file_bytes = 0\n", "documents.max_file_bytes"),
        ('[documents]\nmax_file_bytes = "2GB"\n', "documents.max_file_bytes"),
        ("[documents]\nmedia_types = []\n", "documents.media_types"),
        ('[documents]\nmedia_types = ["pdf"]\n', "documents.media_types"),
        ('[documents]\nmedia_types = ["Application/PDF"]\n', "documents.media_types"),
        ("[documents]\ndirectory = 7\n", "documents.directory"),
    ],
)
def test_bad_documents_setting_is_named_by_its_key(
    tmp_path: Path, documents: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(_config(tmp_path, documents))
    assert str(info.value).startswith(key), info.value
