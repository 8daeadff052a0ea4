"""The targets file of ``chapar loadtest --targets``: what it accepts, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from certs.pki import init_pki
from loadtest.targets import TargetsError, load_targets

A, B = "SENDER.A", "RECIPIENT.B"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, hub="national", agencies=[A, B])
    return root


def _node(code: str, *, cert_of: str | None = None, extra: str = "") -> str:
    owner = cert_of or code
    return (
        f'[[nodes]]\nagency = "{code}"\naddress = "127.0.0.1:7001"\n'
        f'cert = "agencies/{owner}/client.crt"\nkey = "agencies/{owner}/client.key"\n{extra}'
    )


def _write(pki: Path, text: str) -> Path:
    path = pki / "targets.toml"
    path.write_text(text)
    return path


def test_a_chain_of_nodes_with_paths_read_from_the_files_folder(pki: Path) -> None:
    text = (
        'ca = "ca/root.crt"\nhub_metrics = "127.0.0.1:9100"\n'
        + _node(A)
        + _node(B, extra='metrics = "127.0.0.1:9101"\n')
    )
    targets = load_targets(_write(pki, text))
    assert [n.agency for n in targets.nodes] == [A, B]
    assert [n.metrics for n in targets.nodes] == ["", "127.0.0.1:9101"]
    assert targets.hub_metrics == "127.0.0.1:9100"
    assert targets.nodes[0].credentials.identity().agency == A  # type: ignore[union-attr]
    assert targets.hub_metrics_tls is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('ca = "ca/root.crt"\n' + _node(A), "at least two [[nodes]]"),
        ('ca = "ca/root.crt"\n' + _node(A) + _node(A), "listed twice"),
        ('ca = "ca/root.crt"\n' + _node(A) + _node(B, cert_of=A), "is not a back-end client of"),
        ('ca = "ca/root.crt"\n' + _node(A) + _node("b@d"), "is not an agency code"),
        (
            'ca = "ca/root.crt"\n'
            + _node(A)
            + _node(B).replace(f"agencies/{B}/client.key", f"agencies/{A}/client.key"),
            "private key does not match the client certificate",
        ),
        ('ca = "ca/root.crt"\nhub = 1\n' + _node(A) + _node(B), "targets.toml: hub: unknown key"),
        (
            'ca = "ca/root.crt"\n' + _node(A, extra="port = 1\n") + _node(B),
            "nodes[0].port: unknown key",
        ),
        (_node(A) + _node(B), "ca: missing"),
        ('ca = "ca/missing.crt"\n' + _node(A) + _node(B), "ca: no such file"),
        (
            'ca = "ca/root.crt"\n[[nodes]]\nagency = "SENDER.A"\n' + _node(B),
            "nodes[0].cert: missing",
        ),
        ("ca = [", "targets.toml: not valid TOML"),
    ],
)
def test_an_unusable_file_is_refused_with_what_is_wrong(pki: Path, text: str, message: str) -> None:
    with pytest.raises(TargetsError) as refused:
        load_targets(_write(pki, text))
    assert message in str(refused.value)


def test_a_path_that_cannot_be_read_is_refused_not_raised(tmp_path: Path) -> None:
    # A folder: an OSError other than "no such file", which used to escape as a traceback
    # from the servers' configuration reader this file now shares.
    with pytest.raises(TargetsError, match="cannot read"):
        load_targets(tmp_path)
