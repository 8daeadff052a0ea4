"""A review's proof: an agency signing certificate the hub's configuration lists that
cryptography reads with an exception other than ValueError.

``cryptography`` parses a certificate's extensions lazily and raises ``DuplicateExtension``
(an ``Exception``, not a ``ValueError``) when they are first read, and ``InvalidVersion``
(also not a ``ValueError``) at load for a version it does not know. ``read_certificates``
turns only ValueError into a ConfigError, and ``Hub.reload_if_changed`` catches only
ConfigError, OSError and ValueError around the part that reads the files, then calls
``_trust_directory`` (which reads the extensions: ``is_ca``) outside its ``try``, after it
has already taken the new configuration and the files' stamps. So:

* a reload with such a certificate (DuplicateExtension) raises out of
  ``reload_if_changed`` with the new configuration applied (queue quota, clock window,
  retention, the revocation file's path ...) but not its directory (the suspension in
  the same edit is not published), and the trust store holding the certificates read
  before the bad one; OPERATIONS.md says a file that does not parse is logged and
  ignored, the running directory (and configuration) staying;
* with InvalidVersion the hub does not start with a configuration error naming the key
  (``chapar`` prints ``error: configuration ...`` and exits 2), but stops "by an
  unexpected error" (exit 1), and a reload raises at every ``reload_interval_s``.

And a reload of the revocation file's path: one changed to a file that does not exist.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client_sdk import pb
from node.cluster import Cluster
from node.config import ConfigError, load_hub_config
from node.hub import Hub, build_directory
from node.server import _read_tls, _signer, _trust
from node.storage.hub_store import HubStore

A, B = "000.00.00.G22", "10861234567"
NEW = "NEW.AGENCY"


def _certificate_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NEW)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(4242)
        .not_valid_before(dt.datetime(2020, 1, 1))
        .not_valid_after(dt.datetime(2040, 1, 1))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), False
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.5"), b"\x05\x00"), False
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def _duplicate_extension_pem() -> bytes:
    """Two extensions with the same OID (1.2.3.5 rewritten to 1.2.3.4: same length)."""
    der = _certificate_der()
    assert der.count(b"\x06\x03\x2a\x03\x05") == 1
    return _pem(der.replace(b"\x06\x03\x2a\x03\x05", b"\x06\x03\x2a\x03\x04"))


def _invalid_version_pem() -> bytes:
    """Version field 7 (v3 is 2)."""
    der = _certificate_der()
    assert der.count(b"\xa0\x03\x02\x01\x02") >= 1
    return _pem(der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x07", 1))


def _entry(code: str, certificate: Path, state: str = "active") -> str:
    return (
        f'\n[[agencies]]\ncode = "{code}"\nname = "Agency {code}"\nstate = "{state}"\n'
        f"signing_certificates = [{json.dumps(str(certificate))}]\n"
    )


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    cluster = Cluster.prepare(tmp_path, [A, B])
    config_path = cluster.hub.config
    config = load_hub_config(config_path)
    signer = _signer(config.signing, config.identity)
    trust = _trust(_read_tls(config.tls, config.identity), config.signing)
    directory = build_directory(config, signer, trust.intermediates)
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield Hub(config, store, signer, trust, directory, config_path)
    finally:
        await store.close()


def _edit(hub: Hub, certificate: bytes, tmp_path: Path) -> None:
    """The operator's one edit: a new agency listed (its certificate file as given), B
    suspended, and the queue quota raised."""
    path = tmp_path / "new-agency-signing.crt"
    path.write_bytes(certificate)
    assert hub.config_path is not None
    text = hub.config_path.read_text()
    text = text.replace("[hub]\n", "[hub]\nqueue_quota = 7\n", 1)
    text = text.replace(
        f'name = "Agency {B}"\nstate = "active"', f'name = "Agency {B}"\nstate = "suspended"'
    )
    hub.config_path.write_text(text + _entry(NEW, path))
    hub._sources = ()  # as if the reload loop saw a new modification time


async def test_a_certificate_with_duplicate_extensions_half_applies_a_reload(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before_config = hub.config
    before_version = hub.directory.version
    _edit(hub, _duplicate_extension_pem(), tmp_path)
    caplog.set_level(logging.ERROR, "chapar.hub")
    raised: BaseException | None = None
    try:
        await hub.reload_if_changed()
    except Exception as exc:  # what escapes is the finding
        raised = exc
    state_b = pb.AgencyState.Name(hub.directory.agency(B).state)  # type: ignore[union-attr]
    # A bad file is logged and ignored: nothing of the edit applies ...
    assert raised is None, (
        f"reload raised {type(raised).__name__}: {raised}; queue_quota is now"
        f" {hub.config.queue_quota}, B still {state_b} in the directory"
    )
    assert any("directory not reloaded" in r.getMessage() for r in caplog.records)
    assert hub.directory.version == before_version
    # ... and certainly not half of it: the configuration without its directory.
    assert hub.config is before_config, (
        f"queue_quota now {hub.config.queue_quota}, while B is still"
        f" {pb.AgencyState.Name(hub.directory.agency(B).state)} in the directory"  # type: ignore[union-attr]
    )


async def test_a_certificate_of_an_unknown_version_is_no_configuration_error(
    hub: Hub, tmp_path: Path
) -> None:
    _edit(hub, _invalid_version_pem(), tmp_path)
    assert hub.config_path is not None
    config = load_hub_config(hub.config_path)  # the file names exist: it loads
    # At start (node.server.serve_hub) build_directory must refuse it as a configuration
    # error naming the key, which ``chapar hub serve`` prints and exits 2 with.
    with pytest.raises(ConfigError, match=r"agencies\[2\]\.signing_certificates\[0\]"):
        build_directory(config, hub.signer, hub.trust.intermediates)


def _revocation_file_in_config(hub: Hub, path: Path) -> None:
    """The configuration's ``hub.revocation_file`` set to ``path``, as an operator's edit."""
    assert hub.config_path is not None
    lines = [
        line
        for line in hub.config_path.read_text().splitlines()
        if not line.startswith("revocation_file")
    ]
    at = lines.index("[hub]") + 1
    lines.insert(at, f"revocation_file = {json.dumps(str(path))}")
    hub.config_path.write_text("\n".join(lines) + "\n")
    hub._sources = ()  # as if the reload loop saw a new modification time


async def test_a_revocation_file_path_changed_to_a_missing_file_keeps_the_revocations(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A mistyped path in an edit of the configuration: the file it names does not exist,
    # and read as "nothing revoked" it lifted every revocation in force (a file that
    # vanishes under the same path keeps them). Kept, with an error, until the file the
    # configuration names exists; then that file says what is revoked.
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("0a1b2c\n")
    _revocation_file_in_config(hub, revoked)
    assert await hub.reload_if_changed() == 1
    assert list(hub.directory.message.revoked_serials) == ["0a1b2c"]

    mistyped = tmp_path / "revokd.txt"
    _revocation_file_in_config(hub, mistyped)
    caplog.set_level(logging.ERROR, "chapar.hub")
    await hub.reload_if_changed()
    assert list(hub.directory.message.revoked_serials) == ["0a1b2c"]
    assert 0x0A1B2C in hub.trust.revoked_serials
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"revocation file {mistyped}, as configured now, is missing; keeping the 1 revoked"
        f" serials read from {revoked} in force until it exists"
    ]
    hub._sources = ()  # reloaded again (another edit): still kept, logged once
    await hub.reload_if_changed()
    assert list(hub.directory.message.revoked_serials) == ["0a1b2c"]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    mistyped.write_text("# the file as configured now: nothing revoked\n")
    assert await hub.reload_if_changed() == 1
    assert list(hub.directory.message.revoked_serials) == []
