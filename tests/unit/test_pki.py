"""Tests of the development PKI (certs.pki, certs.cli) against client_sdk's verifier."""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from certs import cli
from certs.pki import (
    INTERMEDIATE_VALIDITY,
    KeyAlgorithm,
    PkiError,
    PkiLayout,
    certificate_kind,
    generate_key,
    init_pki,
    issue_certificate,
    issue_party,
    load_certs,
    load_key,
    renew_certificate,
    revoke_certificate,
    write_certs,
    write_key,
)
from client_sdk import pb
from client_sdk.credentials import key_matches_certificate
from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer, verify_signature
from client_sdk.trust import TrustStore, VerificationError
from node.config import read_revocations

HUB = "national-hub"
AGENCIES = ("000.00.00.G22", "10101010101")
AUDITOR = "court"


def _init(directory: Path, algorithm: KeyAlgorithm = "ed25519") -> PkiLayout:
    return init_pki(
        directory, hub=HUB, agencies=AGENCIES, auditors=[AUDITOR], signing_algorithm=algorithm
    )


@pytest.fixture(scope="module", params=["ed25519", "ecdsa-p256"])
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    algorithm: KeyAlgorithm = request.param
    return _init(tmp_path_factory.mktemp(f"pki-{algorithm}") / "pki", algorithm)


def _store(layout: PkiLayout) -> TrustStore:
    return TrustStore(
        roots=load_certs(layout.root_cert), intermediates=load_certs(layout.intermediate_cert)
    )


def _leaf(path: Path) -> x509.Certificate:
    return load_certs(path)[0]


def _expected_files(layout: PkiLayout) -> list[Path]:
    files = [layout.root_cert, layout.root_key, layout.intermediate_cert, layout.intermediate_key]
    for stem in ("tls", "signing"):
        files += [layout.hub_dir(HUB) / f"{stem}.crt", layout.hub_dir(HUB) / f"{stem}.key"]
    for code in AGENCIES:
        for stem in ("tls", "signing", "client"):
            files += [
                layout.agency_dir(code) / f"{stem}.crt",
                layout.agency_dir(code) / f"{stem}.key",
            ]
    files += [
        layout.auditor_dir(AUDITOR) / "client.crt",
        layout.auditor_dir(AUDITOR) / "client.key",
    ]
    return files


# -- layout and files ---------------------------------------------------------------------


def test_layout_paths(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path)
    assert layout.root_cert == tmp_path / "ca" / "root.crt"
    assert layout.root_key == tmp_path / "ca" / "root.key"
    assert layout.intermediate_cert == tmp_path / "ca" / "intermediate.crt"
    assert layout.intermediate_key == tmp_path / "ca" / "intermediate.key"
    assert layout.hub_dir("h") == tmp_path / "hub" / "h"
    assert layout.agency_dir("AB") == tmp_path / "agencies" / "AB"
    assert layout.auditor_dir("a") == tmp_path / "auditors" / "a"


def test_all_files_exist_and_nothing_else(layout: PkiLayout) -> None:
    expected = set(_expected_files(layout))
    written = {p for p in layout.root.rglob("*") if p.is_file()}
    assert written == expected


def test_key_files_are_private_and_certs_readable(layout: PkiLayout) -> None:
    for path in _expected_files(layout):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".key":
            assert mode == 0o600, path
        else:
            assert mode & 0o022 == 0, path
            assert mode & 0o444 == 0o444 or mode == 0o600, path


def test_chain_files_carry_the_intermediate(layout: PkiLayout) -> None:
    intermediate = load_certs(layout.intermediate_cert)
    assert len(intermediate) == 1
    assert len(load_certs(layout.root_cert)) == 1
    chain_files = [layout.hub_dir(HUB) / "tls.crt", layout.auditor_dir(AUDITOR) / "client.crt"]
    for code in AGENCIES:
        chain_files += [layout.agency_dir(code) / "tls.crt", layout.agency_dir(code) / "client.crt"]
    for path in chain_files:
        certs = load_certs(path)
        assert len(certs) == 2, path
        assert certs[1] == intermediate[0], path
        certs[0].verify_directly_issued_by(certs[1])
    for path in [layout.hub_dir(HUB) / "signing.crt"] + [
        layout.agency_dir(c) / "signing.crt" for c in AGENCIES
    ]:
        assert len(load_certs(path)) == 1, path


def test_keys_match_their_certificates(layout: PkiLayout) -> None:
    for path in _expected_files(layout):
        if path.suffix != ".key":
            continue
        key = load_key(path)
        cert = _leaf(path.with_suffix(".crt"))
        assert key.public_key() == cert.public_key(), path


def test_ca_profiles(layout: PkiLayout) -> None:
    root = _leaf(layout.root_cert)
    intermediate = _leaf(layout.intermediate_cert)
    root.verify_directly_issued_by(root)
    intermediate.verify_directly_issued_by(root)
    for cert, path_length, years in ((root, 1, 10), (intermediate, 0, 5)):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca
        assert bc.value.path_length == path_length
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign
        assert ku.crl_sign
        assert not ku.digital_signature
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert abs(lifetime.days - 365 * years) <= 3
    ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert ski.digest != root_ski.digest


def test_tls_certificate_profile(layout: PkiLayout) -> None:
    cert = _leaf(layout.agency_dir(AGENCIES[0]) / "tls.crt")
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.content_commitment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:chapar:agency:{AGENCIES[0]}"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_client_certificate_profile(layout: PkiLayout) -> None:
    cert = _leaf(layout.agency_dir(AGENCIES[0]) / "client.crt")
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:chapar:client:{AGENCIES[0]}:backend")]


def test_signing_certificate_profile(layout: PkiLayout, request: pytest.FixtureRequest) -> None:
    cert = _leaf(layout.agency_dir(AGENCIES[0]) / "signing.crt")
    algorithm = request.node.callspec.params["layout"]
    expected_type = {"ed25519": ed25519.Ed25519PublicKey, "ecdsa-p256": ec.EllipticCurvePublicKey}
    assert isinstance(cert.public_key(), expected_type[algorithm])
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.content_commitment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:chapar:agency:{AGENCIES[0]}")]


def test_leaves_are_backdated_and_inside_the_intermediate(layout: PkiLayout) -> None:
    now = dt.datetime.now(dt.UTC)
    intermediate = _leaf(layout.intermediate_cert)
    for path in _expected_files(layout):
        if path.suffix != ".crt" or path.parent.name == "ca":
            continue
        cert = _leaf(path)
        assert (
            now - dt.timedelta(minutes=6)
            < cert.not_valid_before_utc
            < now - dt.timedelta(minutes=4)
        )
        assert cert.not_valid_after_utc <= intermediate.not_valid_after_utc
        assert abs((cert.not_valid_after_utc - now).days - 365) <= 1


# -- verification with client_sdk.trust ---------------------------------------------------


def test_every_certificate_verifies_with_its_identity(layout: PkiLayout) -> None:
    store = _store(layout)
    hub = Identity.for_hub(HUB)
    assert store.verify_certificate(_leaf(layout.hub_dir(HUB) / "tls.crt"), "tls") == hub
    assert store.verify_certificate(_leaf(layout.hub_dir(HUB) / "signing.crt"), "signing") == hub
    for code in AGENCIES:
        agency = Identity.for_agency(code)
        directory = layout.agency_dir(code)
        assert store.verify_certificate(_leaf(directory / "tls.crt"), "tls") == agency
        assert store.verify_certificate(_leaf(directory / "signing.crt"), "signing") == agency
        assert store.verify_certificate(_leaf(directory / "client.crt"), "tls") == (
            Identity.for_client(code, "backend")
        )
    assert store.verify_certificate(
        _leaf(layout.auditor_dir(AUDITOR) / "client.crt"), "tls"
    ) == Identity.for_auditor(AUDITOR)


def test_trust_store_from_pem_files(layout: PkiLayout) -> None:
    store = TrustStore.from_pem_files(layout.root_cert, layout.intermediate_cert)
    cert = _leaf(layout.agency_dir(AGENCIES[1]) / "tls.crt")
    assert store.verify_certificate(cert, "tls") == Identity.for_agency(AGENCIES[1])


def test_chain_learned_from_tls_file(layout: PkiLayout) -> None:
    # A peer that only knows the root learns the intermediate from the chain file.
    store = TrustStore(roots=load_certs(layout.root_cert))
    leaf, intermediate = load_certs(layout.hub_dir(HUB) / "tls.crt")
    store.add_certificates([intermediate])
    assert store.verify_certificate(leaf, "tls") == Identity.for_hub(HUB)


@pytest.mark.parametrize(
    ("stem", "usage"), [("signing", "tls"), ("tls", "signing"), ("client", "signing")]
)
def test_wrong_usage_is_refused(layout: PkiLayout, stem: str, usage: str) -> None:
    cert = _leaf(layout.agency_dir(AGENCIES[0]) / f"{stem}.crt")
    with pytest.raises(VerificationError) as info:
        _store(layout).verify_certificate(cert, usage)  # type: ignore[arg-type]
    assert info.value.reason == "CERTIFICATE_USAGE"


def test_ca_certificate_is_refused_as_leaf(layout: PkiLayout) -> None:
    intermediate = _leaf(layout.intermediate_cert)
    key = load_key(layout.intermediate_key)
    forged = issue_certificate(
        issuer_cert=_leaf(layout.root_cert),
        issuer_key=load_key(layout.root_key),
        subject_key=key,
        identity_uri="urn:chapar:agency:EVIL",
        kind="intermediate",
    )
    assert forged.subject == intermediate.subject
    with pytest.raises(VerificationError) as info:
        _store(layout).verify_certificate(forged, "tls")
    assert info.value.reason == "CERTIFICATE_USAGE"


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_signing_keys_work_with_signer(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    layout = init_pki(tmp_path, hub=HUB, agencies=["AB"], signing_algorithm=algorithm)
    directory = layout.agency_dir("AB")
    signer = Signer.from_files(directory / "signing.key", directory / "signing.crt")
    expected = {
        "ed25519": pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ED25519,
        "ecdsa-p256": pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256,
    }[algorithm]
    assert signer.algorithm == expected
    signature = signer.sign(ENVELOPE_PAYLOAD_TYPE, b"header bytes")
    verify_signature(signer.certificate, ENVELOPE_PAYLOAD_TYPE, b"header bytes", signature)
    store = _store(layout)
    assert store.verify_certificate(signer.certificate, "signing") == Identity.for_agency("AB")
    hub_signer = Signer.from_files(
        layout.hub_dir(HUB) / "signing.key", layout.hub_dir(HUB) / "signing.crt"
    )
    assert hub_signer.algorithm == expected


def test_a_signer_refuses_a_key_that_is_not_its_certificates_at_load(layout: PkiLayout) -> None:
    """One agency's signing key with another's certificate (same algorithm, a mix-up of
    files): refused when the Signer is made, not found out when every letter and piece of
    evidence it signs fails verification at the hub and in court."""
    mine, theirs = (layout.agency_dir(code) for code in AGENCIES)
    with pytest.raises(ValueError, match="does not match"):
        Signer.from_files(mine / "signing.key", theirs / "signing.crt")
    with pytest.raises(ValueError, match="does not match"):
        Signer(load_key(mine / "signing.key"), load_certs(theirs / "signing.crt")[0])


@pytest.mark.parametrize("form", ["pkcs8", "traditional"])
def test_a_signer_names_an_encrypted_key_file_as_encrypted(
    layout: PkiLayout, tmp_path: Path, form: str
) -> None:
    """A signing key protected by a passphrase: a ValueError naming the file and saying it
    is encrypted. cryptography's bare TypeError ("Password was not given ...") named no
    file, and was not the ValueError that Signer.from_files says it raises."""
    folder = layout.agency_dir(AGENCIES[0])
    key = load_key(folder / "signing.key")
    fmt = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }[form]
    if form == "traditional" and isinstance(key, ed25519.Ed25519PrivateKey):
        pytest.skip("Ed25519 keys have no traditional OpenSSL form")
    encrypted = tmp_path / "signing.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
        )
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(str(encrypted))} is encrypted"):
        Signer.from_files(encrypted, folder / "signing.crt")
    with pytest.raises(PkiError, match=rf"^{re.escape(str(encrypted))} is encrypted"):
        load_key(encrypted)


# -- refusals -----------------------------------------------------------------------------


def test_init_twice_without_force_is_refused(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, hub=HUB, agencies=["AB"])
    before = layout.root_cert.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        init_pki(tmp_path, hub=HUB, agencies=["AB"])
    assert layout.root_cert.read_bytes() == before
    # force replaces the CA and everything issued under it.
    init_pki(tmp_path, hub=HUB, agencies=["AB"], force=True)
    assert layout.root_cert.read_bytes() != before
    assert stat.S_IMODE(layout.root_key.stat().st_mode) == 0o600
    store = _store(layout)
    store.verify_certificate(_leaf(layout.agency_dir("AB") / "tls.crt"), "tls")


def test_force_rewrites_a_loosened_key_file_as_private(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, hub=HUB, agencies=["AB"])
    layout.root_key.chmod(0o644)
    init_pki(tmp_path, hub=HUB, agencies=["AB"], force=True)
    assert stat.S_IMODE(layout.root_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("hub", "agencies", "auditors", "message"),
    [
        (HUB, ["ab"], [], "invalid agency code"),
        (HUB, ["A"], [], "invalid agency code"),
        (HUB, ["A/B"], [], "invalid agency code"),
        (HUB, [".."], [], "invalid agency code"),
        ("Hub", ["AB"], [], "invalid hub name"),
        ("../hub", ["AB"], [], "invalid hub name"),
        (HUB, ["AB"], ["Court"], "invalid auditor name"),
        (HUB, ["AB", "AB"], [], "more than once"),
        (HUB, "AB", [], "not a single string"),
    ],
)
def test_invalid_names_are_refused_before_writing(
    tmp_path: Path, hub: str, agencies: list[str], auditors: list[str], message: str
) -> None:
    target = tmp_path / "pki"
    with pytest.raises(PkiError, match=message):
        init_pki(target, hub=hub, agencies=agencies, auditors=auditors)
    assert not target.exists()


def test_pki_error_is_a_value_error() -> None:
    assert issubclass(PkiError, ValueError)


def test_bad_validity_and_algorithm_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="validity_days"):
        init_pki(tmp_path, hub=HUB, agencies=["AB"], validity_days=0)
    with pytest.raises(PkiError, match="signing algorithm"):
        init_pki(tmp_path, hub=HUB, agencies=["AB"], signing_algorithm="rsa")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:DSA is deprecated")
def test_dsa_keys_are_refused_with_a_clear_error() -> None:
    # cryptography deprecates DSA; certs/pki.py no longer names it, so importing it stays
    # warning-free, and a DSA key handed in programmatically is refused, not half-used.
    from cryptography.hazmat.primitives.asymmetric import dsa

    dsa_key = dsa.generate_private_key(key_size=2048)
    with pytest.raises(PkiError, match="unsupported issuer key type DSAPrivateKey"):
        issue_certificate(
            issuer_cert=None,
            issuer_key=dsa_key,
            subject_key=generate_key("ed25519"),
            identity_uri=None,
            kind="root",
        )
    with pytest.raises(PkiError, match="unsupported subject key type DSAPrivateKey"):
        issue_certificate(
            issuer_cert=None,
            issuer_key=generate_key("ed25519"),
            subject_key=dsa_key,
            identity_uri=None,
            kind="root",
        )


def test_certificate_from_an_unrelated_root_is_untrusted(layout: PkiLayout) -> None:
    # Same subject names as the real CA, so only the signature check tells them apart.
    other_root_key = generate_key("ecdsa-p256")
    other_root = issue_certificate(
        issuer_cert=None,
        issuer_key=other_root_key,
        subject_key=other_root_key,
        identity_uri=None,
        kind="root",
    )
    assert other_root.subject == _leaf(layout.root_cert).subject
    other_intermediate_key = generate_key("ecdsa-p256")
    other_intermediate = issue_certificate(
        issuer_cert=other_root,
        issuer_key=other_root_key,
        subject_key=other_intermediate_key,
        identity_uri=None,
        kind="intermediate",
    )
    store = _store(layout)
    for issuer_cert, issuer_key in (
        (other_root, other_root_key),
        (other_intermediate, other_intermediate_key),
    ):
        forged = issue_certificate(
            issuer_cert=issuer_cert,
            issuer_key=issuer_key,
            subject_key=generate_key("ecdsa-p256"),
            identity_uri=f"urn:chapar:agency:{AGENCIES[0]}",
            kind="tls",
        )
        with pytest.raises(VerificationError) as info:
            store.verify_certificate(forged, "tls")
        assert info.value.reason == "CERTIFICATE_UNTRUSTED"
    # Even when the foreign intermediate is offered alongside, as a peer would send it.
    store.add_certificates([other_intermediate])
    with pytest.raises(VerificationError) as info:
        store.verify_certificate(forged, "tls")
    assert info.value.reason == "CERTIFICATE_UNTRUSTED"


def test_self_signed_leaf_is_untrusted(layout: PkiLayout) -> None:
    key = generate_key("ed25519")
    forged = issue_certificate(
        issuer_cert=None,
        issuer_key=key,
        subject_key=key,
        identity_uri=f"urn:chapar:agency:{AGENCIES[0]}",
        kind="signing",
    )
    forged.verify_directly_issued_by(forged)
    with pytest.raises(VerificationError) as info:
        _store(layout).verify_certificate(forged, "signing")
    assert info.value.reason == "CERTIFICATE_UNTRUSTED"


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        # Expired, but after the CA's own not_before (now - 5 minutes), so that the
        # certificate is valid at some moment the chain is.
        (dt.timedelta(minutes=-4), dt.timedelta(minutes=-1)),
        (dt.timedelta(days=1), dt.timedelta(days=30)),  # not yet valid
    ],
)
def test_certificate_outside_validity_is_refused(
    layout: PkiLayout, not_before: dt.timedelta, not_after: dt.timedelta
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(
        issuer_cert=_leaf(layout.intermediate_cert),
        issuer_key=load_key(layout.intermediate_key),
        subject_key=generate_key("ecdsa-p256"),
        identity_uri=f"urn:chapar:agency:{AGENCIES[0]}",
        kind="signing",
        not_before=now + not_before,
        not_after=now + not_after,
    )
    store = _store(layout)
    with pytest.raises(VerificationError) as info:
        store.verify_certificate(cert, "signing")
    assert info.value.reason == "CERTIFICATE_EXPIRED"
    # The same certificate is fine at a time inside its validity.
    assert store.verify_certificate(cert, "signing", at=now + not_before + dt.timedelta(seconds=30))


def test_certificate_without_identity_is_refused(layout: PkiLayout) -> None:
    cert = issue_certificate(
        issuer_cert=_leaf(layout.intermediate_cert),
        issuer_key=load_key(layout.intermediate_key),
        subject_key=generate_key("ecdsa-p256"),
        identity_uri=None,
        kind="tls",
        common_name="urn:chapar:agency:AB",
    )
    with pytest.raises(VerificationError) as info:
        _store(layout).verify_certificate(cert, "tls")
    assert info.value.reason == "CERTIFICATE_NO_IDENTITY"


@pytest.mark.parametrize("anchor", ["root", "intermediate-in-tls-ca"])
def test_a_revoked_trust_anchor_refuses_a_chain_at_its_first_verification(
    layout: PkiLayout, anchor: str
) -> None:
    # Found by a security review (F1): the chain walk checked the revocation of the leaf and
    # of each intermediate it passed, but of the CA it found among the roots only the dates,
    # then cached the chain; only the cached path compared every serial. Whoever holds a
    # revoked CA's key minted a fresh leaf per call and was admitted every time.
    root = _leaf(layout.root_cert)
    intermediate = _leaf(layout.intermediate_cert)
    if anchor == "root":
        trust = TrustStore([root], [intermediate])
        revoked = root
    else:
        # tls.ca holding the CA bundle (root and intermediate), as operators often give it:
        # node.server._trust makes every certificate of tls.ca a root of the trust store.
        trust = TrustStore([root, intermediate])
        revoked = intermediate
    trust.set_revoked({revoked.serial_number})

    def fresh_leaf() -> x509.Certificate:  # what the holder of the revoked CA key mints
        return issue_certificate(
            issuer_cert=intermediate,
            issuer_key=load_key(layout.intermediate_key),
            subject_key=generate_key("ecdsa-p256"),
            identity_uri=f"urn:chapar:client:{AGENCIES[0]}:mallory",
            kind="client",
        )

    leaf = fresh_leaf()
    for attempt in (leaf, leaf, fresh_leaf()):  # first look, cached look, next fresh leaf
        with pytest.raises(VerificationError) as refused:
            trust.verify_certificate(attempt, "tls")  # what node.rpc.peer does on every call
        assert refused.value.reason == "CERTIFICATE_REVOKED"
    trust.set_revoked(set())  # a refused chain was not cached: lifting the revocation counts
    assert trust.verify_certificate(leaf, "tls").name == "mallory"


# -- building blocks ----------------------------------------------------------------------


def test_issue_certificate_rejects_inverted_validity() -> None:
    key = generate_key("ecdsa-p256")
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(PkiError, match="not_after"):
        issue_certificate(
            issuer_cert=None,
            issuer_key=key,
            subject_key=key,
            identity_uri=None,
            kind="root",
            not_before=now,
            not_after=now,
        )


def test_issue_certificate_accepts_a_public_subject_key_and_long_codes() -> None:
    ca_key = generate_key("ecdsa-p256")
    ca = issue_certificate(
        issuer_cert=None, issuer_key=ca_key, subject_key=ca_key, identity_uri=None, kind="root"
    )
    code = "A" * 64
    subject = generate_key("ed25519")
    cert = issue_certificate(
        issuer_cert=ca,
        issuer_key=ca_key,
        subject_key=subject.public_key(),
        identity_uri=Identity.for_client(code, "backend").uri,
        kind="client",
    )
    assert cert.public_key() == subject.public_key()
    store = TrustStore(roots=[ca])
    assert store.verify_certificate(cert, "tls") == Identity.for_client(code, "backend")


def test_init_with_a_64_character_agency_code(tmp_path: Path) -> None:
    code = "0" * 64
    layout = init_pki(tmp_path, hub=HUB, agencies=[code])
    cert = _leaf(layout.agency_dir(code) / "client.crt")
    assert _store(layout).verify_certificate(cert, "tls") == Identity.for_client(code, "backend")


def test_write_key_and_certs_round_trip(tmp_path: Path) -> None:
    key = generate_key("ed25519")
    write_key(tmp_path / "sub" / "k.key", key)
    assert stat.S_IMODE((tmp_path / "sub" / "k.key").stat().st_mode) == 0o600
    loaded = load_key(tmp_path / "sub" / "k.key")
    assert loaded.public_key() == key.public_key()
    cert = issue_certificate(
        issuer_cert=None, issuer_key=key, subject_key=key, identity_uri=None, kind="root"
    )
    write_certs(tmp_path / "c.crt", [cert, cert])
    assert load_certs(tmp_path / "c.crt") == [cert, cert]
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(PkiError):
        load_key(tmp_path / "c.crt")
    with pytest.raises(PkiError):
        write_certs(tmp_path / "empty.crt", [])


# -- the certificates in a real mTLS handshake --------------------------------------------


@pytest.fixture
def health_server(layout: PkiLayout) -> Iterator[int]:
    directory = layout.hub_dir(HUB)
    credentials = grpc.ssl_server_credentials(
        [((directory / "tls.key").read_bytes(), (directory / "tls.crt").read_bytes())],
        root_certificates=layout.root_cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("stem", ["tls", "client"])
def test_certificates_work_for_grpc_mtls(layout: PkiLayout, health_server: int, stem: str) -> None:
    directory = layout.agency_dir(AGENCIES[0])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.root_cert.read_bytes(),
        private_key=(directory / f"{stem}.key").read_bytes(),
        certificate_chain=(directory / f"{stem}.crt").read_bytes(),
    )
    with grpc.secure_channel(f"127.0.0.1:{health_server}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unrelated_client_certificate_fails_the_handshake(
    layout: PkiLayout, health_server: int, tmp_path: Path
) -> None:
    other = init_pki(tmp_path, hub=HUB, agencies=["AB"])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.root_cert.read_bytes(),
        private_key=(other.agency_dir("AB") / "tls.key").read_bytes(),
        certificate_chain=(other.agency_dir("AB") / "tls.crt").read_bytes(),
    )
    with (
        grpc.secure_channel(f"127.0.0.1:{health_server}", credentials) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- command line -------------------------------------------------------------------------


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pki"
    argv = ["pki", "init", "--dir", str(target), "--hub", HUB, "--agency", "AB", "--agency", "CD"]
    code = cli.main([*argv, "--auditor", AUDITOR, "--signing-algorithm", "ecdsa-p256"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    assert str(target / "ca" / "root.crt") in out
    assert "urn:chapar:agency:CD" in out
    assert "urn:chapar:auditor:court" in out
    layout = PkiLayout(target)
    signer = Signer.from_files(
        layout.agency_dir("CD") / "signing.key", layout.agency_dir("CD") / "signing.crt"
    )
    assert isinstance(signer.certificate.public_key(), ec.EllipticCurvePublicKey)
    assert (layout.auditor_dir(AUDITOR) / "client.crt").exists()

    # A second run is refused with one line on stderr and no traceback.
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "already exists" in err
    assert "Traceback" not in err
    assert cli.main([*argv, "--force"]) == 0


def test_cli_bad_agency_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["pki", "init", "--dir", str(tmp_path), "--hub", HUB, "--agency", "x"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == "chapar pki init: error: invalid agency code 'x'"


def test_cli_requires_an_agency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["pki", "init", "--dir", str(tmp_path), "--hub", HUB])
    assert info.value.code == 2
    assert "--agency" in capsys.readouterr().err


# -- an existing PKI: issue, renew, revoke ------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (Identity.for_agency("NEW.ONE"), ["tls", "signing", "client"]),
        (Identity.for_client(AGENCIES[0], "archive"), ["client-archive"]),
        (Identity.for_auditor("inspector"), ["client"]),
        (Identity.for_hub("second-hub"), ["tls", "signing"]),
    ],
    ids=["agency", "client", "auditor", "hub"],
)
def test_a_party_issued_later_verifies_like_one_issued_at_init(
    tmp_path: Path, identity: Identity, expected: list[str]
) -> None:
    layout = _init(tmp_path / "pki")
    before = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    written = issue_party(layout.root, identity)
    assert [p.name.removesuffix(".crt") for p in written] == expected
    trust = _store(layout)
    for path in written:
        cert = _leaf(path)
        seen = trust.verify_certificate(cert, certificate_kind(cert))  # type: ignore[arg-type]
        if identity.kind == "agency":  # and its back-end's client certificate
            assert (seen.kind, seen.agency) in {("agency", "NEW.ONE"), ("client", "NEW.ONE")}
        else:
            assert seen == identity
        assert stat.S_IMODE(path.with_suffix(".key").stat().st_mode) == 0o600
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing else touched
    with pytest.raises(PkiError, match="already has"):
        issue_party(layout.root, identity)


def test_issuing_needs_an_existing_pki(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no PKI"):
        issue_party(tmp_path, Identity.for_agency("AB"))


def test_a_renewal_that_cannot_write_the_certificate_leaves_the_old_pair_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills (or a quota is hit) while ``renew`` writes: the node's key and
    certificate must still be a pair, the old one. Writing the new key first and then
    failing on the certificate left the new key beside the old certificate: the node
    could not start (its key matched nothing) and the old key was gone."""
    layout = _init(tmp_path / "pki")
    path = layout.agency_dir(AGENCIES[0]) / "signing.crt"
    key_path = path.with_suffix(".key")
    old_cert, old_key = path.read_bytes(), key_path.read_bytes()
    real_open = os.open

    def full_disk(file: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if Path(file).name.startswith(f".{path.name}."):  # the new certificate's file
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, flags, mode)

    monkeypatch.setattr(os, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        renew_certificate(layout.root, path)
    monkeypatch.undo()
    assert (path.read_bytes(), key_path.read_bytes()) == (old_cert, old_key)
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind
    renew_certificate(layout.root, path)  # once there is room, it renews
    assert key_matches_certificate(load_key(key_path), _leaf(path))


@pytest.mark.parametrize("stem", ["tls", "signing", "client"])
def test_a_renewed_certificate_has_a_new_key_and_the_old_pair_is_kept(
    tmp_path: Path, stem: str
) -> None:
    layout = _init(tmp_path / "pki")
    path = layout.agency_dir(AGENCIES[0]) / f"{stem}.crt"
    old, old_key = _leaf(path), path.with_suffix(".key").read_bytes()
    done = renew_certificate(layout.root, path)
    new = _leaf(path)
    assert new.public_key() != old.public_key()
    assert certificate_kind(new) == certificate_kind(old) == stem
    assert identity_of_certificate(new) == identity_of_certificate(old)
    assert type(new.public_key()) is type(old.public_key())  # the signing algorithm kept
    assert _leaf(done.old_cert) == old
    # The old key is not kept: with its certificate still listed, whoever found it could
    # sign, backdated, what verifies.
    assert not list(path.parent.glob(f"{stem}.*.key"))
    assert path.with_suffix(".key").read_bytes() != old_key
    assert done.old_serial == old.serial_number
    assert len(load_certs(path)) == len(load_certs(done.old_cert))  # chain files stay chains
    _store(layout).verify_certificate(new, stem)  # type: ignore[arg-type]


def test_a_renewal_keeps_the_names_and_common_name_of_a_certificate_made_elsewhere(
    tmp_path: Path,
) -> None:
    # A TLS certificate this CA issued by other means for a real host: renewing it with the
    # profile's names alone would break every peer that checks the host name.
    layout = _init(tmp_path / "pki")
    path = layout.hub_dir(HUB) / "tls.crt"
    identity = identity_of_certificate(_leaf(path))
    assert identity is not None
    key = generate_key("ecdsa-p256")
    host = x509.DNSName("hub.exchange.example")
    made = issue_certificate(
        issuer_cert=_leaf(layout.intermediate_cert),
        issuer_key=load_key(layout.intermediate_key),
        subject_key=key,
        identity_uri=identity.uri,
        kind="tls",
        common_name="Exchange hub, building 4",
        extra_sans=[
            host,
            host,  # a name twice: kept once
            x509.RFC822Name("ops@exchange.example"),
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops")])),
        ],
    )
    write_key(path.with_suffix(".key"), key)
    write_certs(path, [made, _leaf(layout.intermediate_cert)])
    done = renew_certificate(layout.root, path)
    new = _leaf(path)
    names = list(new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert host in names
    assert len(names) == len(set(names))  # the identity and loopback names not doubled
    assert x509.UniformResourceIdentifier(identity.uri) in names
    assert new.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Exchange hub, building 4"
    )
    assert done.kept_names == (
        "DNS:hub.exchange.example",
        "email:ops@exchange.example",
        "DirName:CN=ops",
    )
    assert not done.capped


def test_a_renewal_says_when_the_intermediate_cuts_its_validity_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _init(tmp_path / "pki")
    path = layout.agency_dir(AGENCIES[0]) / "signing.crt"
    done = renew_certificate(layout.root, path, validity_days=30)
    assert not done.capped
    assert not done.kept_names
    assert _leaf(path).not_valid_after_utc == done.not_after
    days = INTERMEDIATE_VALIDITY.days
    argv = ["pki", "renew", str(path), "--dir", str(layout.root), "--validity-days", str(days)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"shorter than the {days} days asked" in out
    assert _leaf(path).not_valid_after_utc == _leaf(layout.intermediate_cert).not_valid_after_utc


def test_renewal_refuses_a_ca_or_another_pkis_certificate(tmp_path: Path) -> None:
    layout = _init(tmp_path / "pki")
    other = _init(tmp_path / "other")
    with pytest.raises(PkiError, match="CA certificate"):
        renew_certificate(layout.root, layout.intermediate_cert)
    with pytest.raises(PkiError, match="not issued by"):
        renew_certificate(layout.root, other.agency_dir(AGENCIES[0]) / "tls.crt")


def test_revoking_appends_once_and_keeps_what_the_file_had(tmp_path: Path) -> None:
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("# revoked by hand\n0ABC")  # no newline at the end
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    assert revoke_certificate(file, cert, note="laptop\nlost")
    assert not revoke_certificate(file, cert)
    lines = file.read_text().splitlines()
    serial = _leaf(cert).serial_number
    assert lines[:2] == ["# revoked by hand", "0ABC"]
    assert lines[2].startswith(f"{serial:x}  # urn:chapar:client:{AGENCIES[0]}:backend")
    assert lines[2].endswith("laptop lost")
    assert read_revocations(file) == ["0abc", f"{serial:x}"]  # as the hub reads it


def test_revoking_keeps_the_files_mode_owner_and_group(tmp_path: Path) -> None:
    """The operator made the hub's revocation file readable by the hub's group (0660 here,
    group chapar): `chapar pki revoke` replaced it with 0644 under the current user and
    group (the mode the PKI gives certificates, and the umask's), so a hub reading it
    through its group could no longer, or others now could."""
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("0abc\n")
    file.chmod(0o660)  # group-writable: the umask (022) alone would take that away
    other_groups = [g for g in os.getgroups() if g != os.getegid()]
    if os.geteuid() == 0:  # as root, any owner and group can be kept
        os.chown(file, 4242, 4243)
    elif other_groups:  # a member of a group may give a file of its own to it
        os.chown(file, -1, other_groups[0])
    before = file.stat()
    assert revoke_certificate(file, layout.agency_dir(AGENCIES[0]) / "client.crt")
    after = file.stat()
    assert stat.S_IMODE(after.st_mode) == 0o660
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    serial = _leaf(layout.agency_dir(AGENCIES[0]) / "client.crt").serial_number
    assert read_revocations(file) == ["0abc", f"{serial:x}"]


def test_revoking_as_a_user_who_may_not_give_the_group_keeps_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not root and not a member of the file's group: the new file is the user's, with the
    # old mode; the revocation is written all the same.
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("0abc\n")
    file.chmod(0o640)

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)
    if os.geteuid() == 0:
        os.chown(file, 4242, 4243)
    assert revoke_certificate(file, layout.agency_dir(AGENCIES[0]) / "client.crt")
    after = file.stat()
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (os.geteuid(), os.getegid())
    assert len(read_revocations(file)) == 2


def test_revoke_warns_when_the_file_could_not_keep_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user who may not give the file its group (not root, not a member) writes the
    revocation under the user's own group: a hub reading the file through its group then
    cannot, and `chapar pki revoke` said nothing of it. It says so on stderr, naming the
    file and the group, and still succeeds (the revocation is written)."""
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("0abc\n")
    file.chmod(0o640)
    other_groups = [g for g in os.getgroups() if g != os.getegid()]
    if os.geteuid() == 0:
        os.chown(file, 4242, 4243)
    elif other_groups:
        os.chown(file, -1, other_groups[0])
    else:
        pytest.skip("needs root, or a user in a second group, to give the file another group")
    group = file.stat().st_gid

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    assert cli.main(["pki", "revoke", "--file", str(file), str(cert)]) == 0
    out, err = capsys.readouterr()
    assert "listed in" in out
    assert file.stat().st_gid == os.getegid()
    assert len(read_revocations(file)) == 2
    assert err.count("\n") == 1
    assert err.startswith("chapar pki revoke: warning: ")
    assert str(file) in err
    assert str(group) in err  # gid 4243 has no name here: its number


def test_revoke_says_nothing_when_the_file_keeps_its_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("0abc\n")
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    assert cli.main(["pki", "revoke", "--file", str(file), str(cert)]) == 0
    assert capsys.readouterr().err == ""


def test_revoke_refuses_a_file_whose_directory_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --file (here its directory) made the directories and a new file and
    reported the certificate listed, while the hub reads another file. Refused, nothing
    made."""
    layout = _init(tmp_path / "pki")
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    file = tmp_path / "hbu" / "revoked.txt"  # the hub's is hub/revoked.txt
    assert cli.main(["pki", "revoke", "--file", str(file), str(cert)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("chapar pki revoke: error: ")
    assert str(file.parent) in err
    assert "nothing written" in err
    assert not file.parent.exists()
    with pytest.raises(FileNotFoundError):
        revoke_certificate(file, cert)
    assert not file.parent.exists()


def test_revoke_says_so_when_it_makes_a_new_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first revocation makes the file, and so does a mistyped file name: either way it
    is said on stderr, naming the path, so a typo is seen."""
    layout = _init(tmp_path / "pki")
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    file = tmp_path / "revokd.txt"
    assert cli.main(["pki", "revoke", "--file", str(file), str(cert)]) == 0
    out, err = capsys.readouterr()
    assert "listed in" in out
    assert len(read_revocations(file)) == 1
    assert err.count("\n") == 1
    assert err.startswith(f"chapar pki revoke: warning: {file} did not exist: ")
    assert "new revocation file" in err
    assert cli.main(["pki", "revoke", "--file", str(file), str(cert)]) == 0
    assert capsys.readouterr().err == ""  # it exists now


def test_a_new_revocation_file_is_0644(tmp_path: Path) -> None:
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    old = os.umask(0o022)
    try:
        assert revoke_certificate(file, layout.agency_dir(AGENCIES[0]) / "client.crt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(file.stat().st_mode) == 0o644


@pytest.mark.parametrize("text", ["svc\nnot-hex", "svc\x85abc", "svc\u2028abc", "svc\rabc"])
def test_a_subject_or_note_with_a_line_break_writes_one_line(tmp_path: Path, text: str) -> None:
    # A certificate without a Chapar identity is described by its subject: a line break in
    # it wrote a line of its own, which the hub could not read (or took for a serial).
    layout = _init(tmp_path / "pki")
    key = generate_key("ecdsa-p256")
    cert = issue_certificate(
        issuer_cert=_leaf(layout.intermediate_cert),
        issuer_key=load_key(layout.intermediate_key),
        subject_key=key,
        identity_uri=None,
        kind="client",
        common_name=text,
    )
    path = tmp_path / "odd.crt"
    write_certs(path, [cert])
    file = tmp_path / "revoked.txt"
    assert revoke_certificate(file, path, note=f"why: {text}")
    assert read_revocations(file) == [f"{cert.serial_number:x}"]
    assert len(file.read_text(encoding="utf-8").splitlines()) == 1


def test_a_revocation_file_with_a_comment_in_another_encoding_still_reads_and_keeps_it(
    tmp_path: Path,
) -> None:
    # Read as UTF-8 strictly, a comment typed in Windows-1256 made every hub reload fail
    # (the old list kept, new revocations not applied) and `chapar pki revoke` crash.
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    legacy = "0abc  # لغو شد\n".encode("cp1256")
    file.write_bytes(legacy)
    assert read_revocations(file) == ["0abc"]
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    assert revoke_certificate(file, cert)
    assert file.read_bytes().startswith(legacy)  # left as it was, byte for byte
    assert read_revocations(file) == ["0abc", f"{_leaf(cert).serial_number:x}"]


@pytest.mark.parametrize(
    "data",
    [
        b"0abc  # \xc2\x85beef\n",  # NEL in a comment (cp1256 for the letters of one word)
        b"0abc  # old key\x0c1403\n",  # a form feed
        b"0abc  # \xe2\x80\xa8dead\n",  # U+2028
        b"\xef\xbb\xbf0abc\n",  # a BOM (Notepad)
        b"0abc\r\n",
    ],
    ids=["nel", "form-feed", "line-separator", "bom", "crlf"],
)
def test_a_revocation_file_line_ends_only_at_a_line_feed(tmp_path: Path, data: bytes) -> None:
    # str.splitlines also splits at NEL, form feeds and U+2028: the rest of a comment read
    # as another serial (revoking it), or as a line the hub refused, keeping its old list.
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_bytes(data)
    assert read_revocations(file) == ["0abc"]
    cert = layout.agency_dir(AGENCIES[0]) / "client.crt"
    write_certs(cert.with_name("abc.crt"), [_self_signed_with_serial(0xABC)])
    assert not revoke_certificate(file, cert.with_name("abc.crt"))  # listed already


def _self_signed_with_serial(serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "serial")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_a_ca_certificate_with_a_key_of_unknown_type_is_passed_over(layout: PkiLayout) -> None:
    # Its subject the intermediate's, its key of a type cryptography cannot load: checking
    # a leaf against it raised UnsupportedAlgorithm out of verification (a traceback in
    # chapar verify), and the genuine intermediate behind it was never tried.
    intermediate = _leaf(layout.intermediate_cert)
    der = intermediate.public_bytes(serialization.Encoding.DER)
    ec_oid = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
    odd = x509.load_der_x509_certificate(der.replace(ec_oid, bytes.fromhex("06072a8648ce3d0209")))
    trust = TrustStore(roots=load_certs(layout.root_cert))
    trust.add_certificates([odd, intermediate])
    leaf = _leaf(layout.agency_dir(AGENCIES[0]) / "signing.crt")
    assert trust.verify_certificate(leaf, "signing").agency == AGENCIES[0]


@pytest.mark.parametrize("order", ["old first", "new first"])
def test_a_ca_certified_again_under_its_name_and_key_verifies_then_and_now(order: str) -> None:
    # The intermediate's old certificate expired and a new one was issued for the same key:
    # the store holds both, and a leaf it signed verifies at any time one of them was
    # valid. The chain took the first that matched and failed on its validity.
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    root_key, ca_key, leaf_key = (generate_key("ecdsa-p256") for _ in range(3))
    root = issue_certificate(issuer_cert=None, issuer_key=root_key, subject_key=root_key,
                             identity_uri=None, kind="root", common_name="Root",
                             not_before=now - 2000 * day, not_after=now + 2000 * day)  # fmt: skip
    old, new = (
        issue_certificate(
            issuer_cert=root,
            issuer_key=root_key,
            subject_key=ca_key,
            identity_uri=None,
            kind="intermediate",
            common_name="Intermediate",
            not_before=start,
            not_after=end,
        )
        for start, end in ((now - 1000 * day, now - day), (now - 100 * day, now + 1000 * day))
    )
    leaf = issue_certificate(issuer_cert=new, issuer_key=ca_key, subject_key=leaf_key,
                             identity_uri="urn:chapar:agency:000.00.00.G22", kind="signing",
                             not_before=now - 500 * day, not_after=now + 300 * day)  # fmt: skip
    for when in (now, now - 200 * day):
        store = TrustStore([root])
        store.add_certificates([old, new] if order == "old first" else [new, old])
        assert store.verify_certificate(leaf, "signing", when).agency == "000.00.00.G22"
    store = TrustStore([root])
    store.add_certificates([old])
    with pytest.raises(VerificationError) as info:  # with the old one alone: expired now
        store.verify_certificate(leaf, "signing", now)
    assert info.value.reason == "CERTIFICATE_EXPIRED"


def _record_syncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``("fsync", path)`` for each file or directory synced and ``("replace", path)`` for
    each file renamed (by the path it had), in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(Path(src).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_renewal_syncs_each_new_file_before_its_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss right after ``renew`` must not leave an empty key file under the new
    name: each new file's data is synced before it is renamed into place, and the
    directory (the renames themselves) after. Power loss cannot be simulated; the order of
    the calls is what can be checked."""
    layout = _init(tmp_path / "pki")
    path = layout.agency_dir(AGENCIES[0]) / "tls.crt"
    folder = path.parent.resolve()
    events = _record_syncs_and_renames(monkeypatch)
    renew_certificate(layout.root, path)
    monkeypatch.undo()
    renamed = [name for what, name in events if what == "replace"]
    assert len(renamed) == 2  # the key and the certificate
    for name in renamed:
        assert events.index(("fsync", name)) < events.index(("replace", name))
    assert ("fsync", str(folder)) in events[events.index(("replace", renamed[-1])) :]


def test_a_revocation_file_is_synced_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _init(tmp_path / "pki")
    file = tmp_path / "revoked.txt"
    file.write_text("0abc\n")
    events = _record_syncs_and_renames(monkeypatch)
    assert revoke_certificate(file, layout.agency_dir(AGENCIES[0]) / "client.crt")
    monkeypatch.undo()
    [(_, staged)] = [e for e in events if e[0] == "replace"]
    assert events.index(("fsync", staged)) < events.index(("replace", staged))
    assert events[-1] == ("fsync", str(tmp_path.resolve()))
