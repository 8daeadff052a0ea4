"""The development PKI: key generation, certificate issuance and the on-disk layout.

This module owns everything ``chapar pki`` writes: a root CA, one intermediate CA and, under
it, the TLS, signing and client certificates of a hub, its agencies and optional auditors
(see ``certs/README.md`` for the layout). It also offers the generic building blocks
(:func:`generate_key`, :func:`issue_certificate`, :func:`write_key`, :func:`write_certs`,
:func:`load_key`, :func:`load_certs`) that security tests use to forge expired, not-yet-valid,
self-signed, foreign-CA and wrong-usage certificates.

Identity is only ever carried in a ``urn:chapar:`` SAN URI (see ``client_sdk.identity``);
the subject CN is a human-readable label and nothing reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import load_private_key

__all__ = [
    "CertificateKind",
    "KeyAlgorithm",
    "PkiError",
    "PkiLayout",
    "PrivateKey",
    "Renewal",
    "SubjectKey",
    "certificate_kind",
    "generate_key",
    "init_pki",
    "issue_certificate",
    "issue_party",
    "load_certs",
    "load_key",
    "renew_certificate",
    "revocation_entry",
    "revocation_file_lines",
    "revoke_certificate",
    "rfc3339_time",
    "write_certs",
    "write_key",
]

KeyAlgorithm = Literal["ed25519", "ecdsa-p256"]
CertificateKind = Literal["root", "intermediate", "tls", "client", "signing"]
# The key types Chapar itself uses (the same pair client_sdk.signing accepts).
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
# A subject may be given by its private key (the usual case) or by its public key alone
# (issuing for a key held elsewhere, e.g. a renewal).
SubjectKey = CertificateIssuerPrivateKeyTypes | CertificatePublicKeyTypes

_KEY_ALGORITHMS: tuple[str, ...] = get_args(KeyAlgorithm)
_KINDS: tuple[str, ...] = get_args(CertificateKind)

# Lifetimes: a dev root outlives everything it signs; leaves default to a year and
# init_pki keeps them inside the intermediate's lifetime.
ROOT_VALIDITY = dt.timedelta(days=3650)
INTERMEDIATE_VALIDITY = dt.timedelta(days=1825)
LEAF_VALIDITY = dt.timedelta(days=365)
# Backdating not_before tolerates small clock differences between the machines of a test
# or demo; without it a certificate minted a second ago can look "not yet valid" elsewhere.
CLOCK_SKEW = dt.timedelta(minutes=5)

_DEFAULT_LIFETIME: dict[str, dt.timedelta] = {
    "root": ROOT_VALIDITY,
    "intermediate": INTERMEDIATE_VALIDITY,
    "tls": LEAF_VALIDITY,
    "client": LEAF_VALIDITY,
    "signing": LEAF_VALIDITY,
}
# The public key types a certificate of ours may carry; every one of them can also issue.
_PublicKey = (
    ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey | rsa.RSAPublicKey
)
# X.520 upper bound for a CommonName; cryptography refuses longer values, and a 64-character
# agency code plus a label would exceed it.
_CN_MAX = 64
_ORGANIZATION = "Chapar development PKI"
ROOT_COMMON_NAME = "Chapar Development Root CA"
INTERMEDIATE_COMMON_NAME = "Chapar Development Intermediate CA"
# Loopback names on every TLS certificate so gRPC's host name check passes whether a test
# dials localhost, 127.0.0.1 or [::1]. Identity still comes only from the URI.
_LOOPBACK_SANS: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    x509.IPAddress(ipaddress.IPv6Address("::1")),
)
_BACKEND_CLIENT_NAME = "backend"

_KEY_MODE = 0o600
_CERT_MODE = 0o644


class PkiError(ValueError):
    """Bad input to the PKI tooling or a refusal (e.g. an existing PKI); the message says which."""


@dataclass(frozen=True, slots=True)
class PkiLayout:
    """Where the files of a development PKI rooted at ``root`` live."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.ca_dir / "intermediate.crt"

    @property
    def intermediate_key(self) -> Path:
        return self.ca_dir / "intermediate.key"

    def hub_dir(self, name: str) -> Path:
        """``hub/<NAME>/``: tls.crt/key and signing.crt/key."""
        return self.root / "hub" / name

    def agency_dir(self, code: str) -> Path:
        """``agencies/<CODE>/``: tls, signing and the back-end's client certificate."""
        return self.root / "agencies" / code

    def auditor_dir(self, name: str) -> Path:
        """``auditors/<NAME>/``: client.crt/key."""
        return self.root / "auditors" / name


# ---------------------------------------------------------------------------------------
# Keys and files


def generate_key(algorithm: KeyAlgorithm) -> PrivateKey:
    """A new private key: Ed25519, or ECDSA on P-256."""
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(
        f"unknown key algorithm {algorithm!r} (expected one of {', '.join(_KEY_ALGORITHMS)})"
    )


def _staged(path: Path, data: bytes, mode: int, like: os.stat_result | None = None) -> Path:
    """A fresh temporary file beside ``path`` holding ``data``, created with ``mode``.

    It is created with O_EXCL and its final mode, so a private key is never readable by
    others, not even for a moment; renamed over ``path``, an existing file there (whatever
    its mode, or a symlink) is replaced rather than written through. Given ``like`` (the
    file it is to replace), it takes that file's mode exactly (not through the umask) and,
    before any data goes in, its owner and group as far as the user may give them: both
    as root, the group when the user is a member of it, else the user's own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode if like is None else _KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            if like is not None:
                _take_ownership_of(handle.fileno(), like)
            handle.write(data)
            handle.flush()
            # Synced before it is renamed: after a power loss the name could otherwise be
            # durable and the data not (an empty key file where the old pair was).
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _take_ownership_of(fd: int, like: os.stat_result) -> None:
    """Gives the open file ``fd`` the owner, group and mode of ``like``, as far as allowed.
    The owner and group come first: a chown by another than root may clear set-id bits,
    and the file is private (0600) until its mode is set."""
    if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, like.st_uid, like.st_gid)
        except PermissionError:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, like.st_gid)
    os.fchmod(fd, stat.S_IMODE(like.st_mode))


def _fsync_dir(path: Path) -> None:
    """Makes the renames into directory ``path`` durable. A filesystem that cannot sync a
    directory (some network ones refuse) has done what it can: the files are synced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_files(files: Sequence[tuple[Path, bytes, int]], *, keep: bool = False) -> None:
    """Writes each ``(path, data, mode)`` through a fresh file (``_staged``), all of them
    before any takes its name: a key and its certificate are replaced together, or (a full
    disk, a quota, a permission) neither is, never a new key beside the old certificate.
    Each file is synced before its rename and each directory after, so what ``chapar pki``
    reports done survives a power loss. With ``keep``, a file replaced keeps its mode,
    owner and group (see ``_staged``); a new one gets ``mode``."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            like = _stat_or_none(path) if keep else None
            staged.append((_staged(path, data, mode, like), path))
        for tmp, path in staged:
            os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for _, path in staged):
            _fsync_dir(folder)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certs_pem(path: Path, certs: Iterable[x509.Certificate]) -> bytes:
    pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    if not pem:
        raise PkiError(f"{path}: no certificates to write")
    return pem


def write_key(path: Path, key: CertificateIssuerPrivateKeyTypes) -> None:
    """Writes ``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation."""
    _write_new_files([(path, _key_pem(key), _KEY_MODE)])


def write_certs(path: Path, certs: Iterable[x509.Certificate]) -> None:
    """Writes the certificates as concatenated PEM (leaf first for a chain), mode 0644."""
    _write_new_files([(path, _certs_pem(path, certs), _CERT_MODE)])


def load_key(path: Path) -> PrivateKey:
    """Reads an unencrypted PEM private key of a type Chapar uses (Ed25519 or ECDSA)."""
    try:
        key = load_private_key(path.read_bytes(), str(path))
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path}: unsupported private key type {type(key).__name__}")
    return key


def load_certs(path: Path) -> list[x509.Certificate]:
    """Reads every certificate of a PEM file (a chain file yields leaf then intermediate)."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"{path}: no PEM certificates ({exc})") from exc


# ---------------------------------------------------------------------------------------
# Issuing


def _public_key_of(key: SubjectKey) -> _PublicKey:
    if isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | rsa.RSAPrivateKey,
    ):
        return key.public_key()
    if isinstance(key, _PublicKey):
        return key
    raise PkiError(f"unsupported subject key type {type(key).__name__}")


def _hash_for(issuer_key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # EdDSA (and other pure signature schemes) hash internally and must be given None.
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return hashes.SHA256()
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    # DSA (which cryptography now deprecates) and any other type is not ours to issue with.
    raise PkiError(f"unsupported issuer key type {type(issuer_key).__name__}")


def _default_common_name(kind: CertificateKind, identity_uri: str | None) -> str:
    if kind == "root":
        return ROOT_COMMON_NAME
    if kind == "intermediate":
        return INTERMEDIATE_COMMON_NAME
    label = identity_uri.removeprefix("urn:chapar:") if identity_uri else "unnamed"
    return f"{label} {kind}"


def _key_usage(
    *, digital_signature: bool = False, content_commitment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue_certificate(
    *,
    issuer_cert: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    subject_key: SubjectKey,
    identity_uri: str | None,
    kind: CertificateKind,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    common_name: str | None = None,
    extra_sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """Issues one certificate of ``kind`` for ``subject_key``, signed with ``issuer_key``.

    ``issuer_cert=None`` makes it self-signed (issuer name = subject name). ``identity_uri``
    becomes the SAN URI (None: no Chapar identity at all); ``extra_sans`` are appended
    as-is. The profile (basic constraints, key usage, extended key usage) follows ``kind``:

    * root / intermediate: CA, path length 1 / 0, keyCertSign + cRLSign.
    * tls: serverAuth + clientAuth, digitalSignature, plus loopback DNS/IP SANs.
    * client: clientAuth, digitalSignature.
    * signing: digitalSignature + contentCommitment, no extended key usage.

    Nothing here checks that the inputs make sense (a key that does not match
    ``issuer_cert``, a validity in the past, a URI that is not Chapar's): tests rely on
    being able to forge exactly such certificates.
    """
    if kind not in _KINDS:
        raise PkiError(f"unknown certificate kind {kind!r} (expected one of {', '.join(_KINDS)})")
    public_key = _public_key_of(subject_key)
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - CLOCK_SKEW
    end = not_after if not_after is not None else start + CLOCK_SKEW + _DEFAULT_LIFETIME[kind]
    if end <= start:
        raise PkiError(
            f"not_after ({end.isoformat()}) must be later than not_before ({start.isoformat()})"
        )

    label = (common_name or _default_common_name(kind, identity_uri))[:_CN_MAX]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, label),
        ]
    )
    issuer_name = issuer_cert.subject if issuer_cert is not None else subject

    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    if issuer_cert is None:
        # Self-signed: the authority key is the signing key itself.
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    else:
        try:
            issuer_ski = issuer_cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                _public_key_of(issuer_cert.public_key())
            )

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )

    if kind in ("root", "intermediate"):
        # Root may sign one level of CA (the intermediate); the intermediate signs only leaves.
        path_length = 1 if kind == "root" else 0
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        builder = builder.add_extension(_key_usage(ca=True), critical=True)
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if kind == "signing":
            # contentCommitment (non-repudiation) is what marks a key as signing letters and
            # evidence; client_sdk.trust refuses it for TLS, so the two roles never mix.
            builder = builder.add_extension(
                _key_usage(digital_signature=True, content_commitment=True), critical=True
            )
        else:
            builder = builder.add_extension(_key_usage(digital_signature=True), critical=True)
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
            if kind == "tls":
                # Nodes and the hub are both servers and clients of each other's streams.
                usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)

    names: list[x509.GeneralName] = []
    if identity_uri is not None:
        names.append(x509.UniformResourceIdentifier(identity_uri))
    if kind == "tls":
        names.extend(_LOOPBACK_SANS)
    names.extend(extra_sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)

    return builder.sign(issuer_key, _hash_for(issuer_key))


# ---------------------------------------------------------------------------------------
# The whole development PKI


@dataclass(frozen=True, slots=True)
class _Issuer:
    cert: x509.Certificate
    key: PrivateKey


def _validated_identities(
    hub: str, agencies: Sequence[str], auditors: Sequence[str]
) -> tuple[Identity, list[Identity], list[Identity]]:
    """Checks every name before anything is written, so bad input leaves no partial PKI."""
    if isinstance(agencies, str) or isinstance(auditors, str):
        # A bare string is a Sequence[str] too; "ABC" would become agencies A, B and C.
        raise PkiError("agencies and auditors must be lists of names, not a single string")
    try:
        hub_identity = Identity.for_hub(hub)
        agency_identities = [Identity.for_agency(code) for code in agencies]
        auditor_identities = [Identity.for_auditor(name) for name in auditors]
    except ValueError as exc:
        raise PkiError(str(exc)) from exc
    for identity in agency_identities:
        # The agency code names a directory, and the code syntax admits "..", which would
        # write the agency's files one level up, over the PKI root.
        if identity.agency == "..":
            raise PkiError(f"invalid agency code {identity.agency!r}: not a usable directory name")
    for kind, values in (("agency", list(agencies)), ("auditor", list(auditors))):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise PkiError(f"{kind} given more than once: {', '.join(duplicates)}")
    return hub_identity, agency_identities, auditor_identities


def _issue_leaf(
    issuer: _Issuer,
    directory: Path,
    stem: str,
    kind: CertificateKind,
    identity: Identity,
    algorithm: KeyAlgorithm,
    not_after: dt.datetime,
    *,
    common_name: str | None = None,
    extra_sans: Sequence[x509.GeneralName] = (),
) -> None:
    key = generate_key(algorithm)
    cert = issue_certificate(
        issuer_cert=issuer.cert,
        issuer_key=issuer.key,
        subject_key=key,
        identity_uri=identity.uri,
        kind=kind,
        not_after=not_after,
        common_name=common_name,
        extra_sans=extra_sans,
    )
    # TLS and client files carry the intermediate too: gRPC sends exactly what it is given,
    # and peers trust only the root, so the chain must travel with the leaf.
    chain = [cert] if kind == "signing" else [cert, issuer.cert]
    cert_path = directory / f"{stem}.crt"
    _write_new_files(
        [
            (directory / f"{stem}.key", _key_pem(key), _KEY_MODE),
            (cert_path, _certs_pem(cert_path, chain), _CERT_MODE),
        ]
    )


def init_pki(
    directory: Path,
    *,
    hub: str,
    agencies: Sequence[str],
    signing_algorithm: KeyAlgorithm = "ed25519",
    auditors: Sequence[str] = (),
    force: bool = False,
    validity_days: int = 365,
) -> PkiLayout:
    """Creates a complete development PKI under ``directory`` and returns its layout.

    Refuses to overwrite an existing PKI (``ca/root.crt`` or ``ca/root.key`` present) unless
    ``force``; with ``force`` the files it writes are replaced and any others are left alone.
    Leaf certificates are valid for ``validity_days``; TLS and client keys are always
    ECDSA P-256, signing keys follow ``signing_algorithm``.
    """
    if signing_algorithm not in _KEY_ALGORITHMS:
        raise PkiError(
            f"unknown signing algorithm {signing_algorithm!r} "
            f"(expected one of {', '.join(_KEY_ALGORITHMS)})"
        )
    max_days = INTERMEDIATE_VALIDITY.days
    if not 1 <= validity_days <= max_days:
        # A leaf that outlives its intermediate would fail chain validation at the end anyway.
        raise PkiError(f"validity_days must be between 1 and {max_days}, got {validity_days}")
    hub_identity, agency_identities, auditor_identities = _validated_identities(
        hub, agencies, auditors
    )

    layout = PkiLayout(Path(directory))
    if layout.root.exists() and not layout.root.is_dir():
        raise PkiError(f"{layout.root} exists and is not a directory")
    if not force and (layout.root_cert.exists() or layout.root_key.exists()):
        raise PkiError(
            f"a PKI already exists in {layout.root} ({layout.root_cert} is present); "
            "use --force / force=True to replace it"
        )
    layout.root.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    root_key = generate_key("ecdsa-p256")
    root_cert = issue_certificate(
        issuer_cert=None, issuer_key=root_key, subject_key=root_key, identity_uri=None, kind="root"
    )
    intermediate_key = generate_key("ecdsa-p256")
    intermediate_cert = issue_certificate(
        issuer_cert=root_cert,
        issuer_key=root_key,
        subject_key=intermediate_key,
        identity_uri=None,
        kind="intermediate",
    )
    _write_new_files(  # with --force: the old CA stays whole if these cannot be written
        [
            (layout.root_key, _key_pem(root_key), _KEY_MODE),
            (layout.root_cert, _certs_pem(layout.root_cert, [root_cert]), _CERT_MODE),
            (layout.intermediate_key, _key_pem(intermediate_key), _KEY_MODE),
            (
                layout.intermediate_cert,
                _certs_pem(layout.intermediate_cert, [intermediate_cert]),
                _CERT_MODE,
            ),
        ]
    )

    issuer = _Issuer(intermediate_cert, intermediate_key)
    leaf_end = min(now + dt.timedelta(days=validity_days), intermediate_cert.not_valid_after_utc)

    hub_dir = layout.hub_dir(hub_identity.name)
    _issue_leaf(issuer, hub_dir, "tls", "tls", hub_identity, "ecdsa-p256", leaf_end)
    _issue_leaf(issuer, hub_dir, "signing", "signing", hub_identity, signing_algorithm, leaf_end)

    for agency in agency_identities:
        agency_dir = layout.agency_dir(agency.agency)
        backend = Identity.for_client(agency.agency, _BACKEND_CLIENT_NAME)
        _issue_leaf(issuer, agency_dir, "tls", "tls", agency, "ecdsa-p256", leaf_end)
        _issue_leaf(issuer, agency_dir, "signing", "signing", agency, signing_algorithm, leaf_end)
        _issue_leaf(issuer, agency_dir, "client", "client", backend, "ecdsa-p256", leaf_end)

    for auditor in auditor_identities:
        auditor_dir = layout.auditor_dir(auditor.name)
        _issue_leaf(issuer, auditor_dir, "client", "client", auditor, "ecdsa-p256", leaf_end)

    return layout


# ---------------------------------------------------------------------------------------
# An existing PKI: new parties, renewals, revocations


def _open_issuer(layout: PkiLayout) -> _Issuer:
    """The intermediate CA of an existing PKI (``chapar pki init`` made it)."""
    if not layout.intermediate_cert.exists() or not layout.intermediate_key.exists():
        raise PkiError(
            f"no PKI in {layout.root}: {layout.intermediate_cert} and its key are missing "
            "(chapar pki init makes one)"
        )
    return _Issuer(load_certs(layout.intermediate_cert)[0], load_key(layout.intermediate_key))


def _leaf_validity(issuer: _Issuer, validity_days: int) -> tuple[dt.datetime, bool]:
    """A new leaf's end, and whether the issuing CA's own end cut ``validity_days`` short
    (a leaf never outlives its issuer)."""
    max_days = INTERMEDIATE_VALIDITY.days
    if not 1 <= validity_days <= max_days:
        raise PkiError(f"validity_days must be between 1 and {max_days}, got {validity_days}")
    end = dt.datetime.now(dt.UTC) + dt.timedelta(days=validity_days)
    return min(end, issuer.cert.not_valid_after_utc), end > issuer.cert.not_valid_after_utc


def issue_party(
    directory: Path,
    identity: Identity,
    *,
    signing_algorithm: KeyAlgorithm = "ed25519",
    validity_days: int = 365,
) -> list[Path]:
    """Issues a new party's certificates from an existing PKI's intermediate CA.

    An agency gets TLS, signing and back-end client certificates, a hub TLS and signing,
    an agency's further client (``urn:chapar:client:<CODE>:<NAME>``) ``client-<NAME>``
    beside the agency's files, an auditor a client certificate. Refuses to replace any
    file (``renew_certificate`` does that). Returns the certificate paths written.
    """
    if signing_algorithm not in _KEY_ALGORITHMS:
        raise PkiError(f"unknown signing algorithm {signing_algorithm!r}")
    layout = PkiLayout(Path(directory))
    issuer = _open_issuer(layout)
    end, _ = _leaf_validity(issuer, validity_days)
    leaves: list[tuple[Path, str, CertificateKind, Identity, KeyAlgorithm]]
    if identity.kind == "agency":
        if identity.agency == "..":
            raise PkiError("invalid agency code '..': not a usable directory name")
        folder = layout.agency_dir(identity.agency)
        backend = Identity.for_client(identity.agency, _BACKEND_CLIENT_NAME)
        leaves = [
            (folder, "tls", "tls", identity, "ecdsa-p256"),
            (folder, "signing", "signing", identity, signing_algorithm),
            (folder, "client", "client", backend, "ecdsa-p256"),
        ]
    elif identity.kind == "hub":
        folder = layout.hub_dir(identity.name)
        leaves = [
            (folder, "tls", "tls", identity, "ecdsa-p256"),
            (folder, "signing", "signing", identity, signing_algorithm),
        ]
    elif identity.kind == "client":
        if identity.agency == "..":
            raise PkiError("invalid agency code '..': not a usable directory name")
        stem = "client" if identity.name == _BACKEND_CLIENT_NAME else f"client-{identity.name}"
        leaves = [(layout.agency_dir(identity.agency), stem, "client", identity, "ecdsa-p256")]
    else:
        leaves = [(layout.auditor_dir(identity.name), "client", "client", identity, "ecdsa-p256")]
    taken = [
        path
        for folder, stem, *_ in leaves
        for path in (folder / f"{stem}.crt", folder / f"{stem}.key")
        if path.exists()
    ]
    if taken:
        raise PkiError(
            f"{identity.uri} already has {taken[0]}; renew a certificate with "
            "`chapar pki renew`, or choose another name"
        )
    for folder, stem, kind, subject, algorithm in leaves:
        _issue_leaf(issuer, folder, stem, kind, subject, algorithm, end)
    return [folder / f"{stem}.crt" for folder, stem, *_ in leaves]


def certificate_kind(cert: x509.Certificate) -> CertificateKind:
    """Which of our profiles a certificate follows, read from its extensions."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "root" if cert.issuer == cert.subject else "intermediate"
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.content_commitment:
            return "signing"
        extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise PkiError(f"not a certificate of a Chapar PKI profile ({exc})") from exc
    return "tls" if ExtendedKeyUsageOID.SERVER_AUTH in extended else "client"


@dataclass(frozen=True, slots=True)
class Renewal:
    """What ``renew_certificate`` did: the new certificate and key at the old paths, the
    old certificate kept beside them under its serial (its key is not kept)."""

    kind: CertificateKind
    identity: Identity
    cert: Path
    old_cert: Path
    old_serial: int
    not_after: dt.datetime
    capped: bool  # the intermediate CA's end came before the validity asked for
    kept_names: tuple[str, ...] = ()  # names of the old certificate beyond its profile's


def renew_certificate(directory: Path, cert_path: Path, *, validity_days: int = 365) -> Renewal:
    """Re-issues a leaf of an existing PKI with a new key: same identity, profile and (for
    signing) algorithm. The new pair takes the old paths, so configurations need no change;
    the old certificate stays as ``<stem>.<serial>.crt`` (a hard link made first, so the
    file is never missing), for what the old key signed to stay verifiable where it is
    listed. The old private key is not kept: whoever found it later could sign with it,
    backdated, what would verify against that certificate."""
    layout = PkiLayout(Path(directory))
    issuer = _open_issuer(layout)
    cert_path = Path(cert_path)
    key_path = cert_path.with_suffix(".key")
    if cert_path.suffix != ".crt" or not key_path.exists():
        raise PkiError(f"{cert_path}: expected a .crt file with its .key beside it")
    old = load_certs(cert_path)[0]
    kind = certificate_kind(old)
    if kind in ("root", "intermediate"):
        raise PkiError(f"{cert_path} is a CA certificate; a new CA is `chapar pki init --force`")
    try:  # names alike are not enough: two development PKIs name their CAs the same
        old.verify_directly_issued_by(issuer.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{cert_path} was not issued by {layout.intermediate_cert}") from exc
    identity = identity_of_certificate(old)
    if identity is None:
        raise PkiError(f"{cert_path} carries no urn:chapar: identity")
    algorithm: KeyAlgorithm = (
        "ed25519" if isinstance(old.public_key(), ed25519.Ed25519PublicKey) else "ecdsa-p256"
    )
    end, capped = _leaf_validity(issuer, validity_days)
    # A certificate made elsewhere by this CA may carry more names than the profile gives
    # (a TLS server's real host name): the renewed one keeps them, and its common name.
    extra = _names_beyond_profile(old, kind, identity)
    names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    stem = cert_path.name.removesuffix(".crt")
    kept = cert_path.with_name(f"{stem}.{old.serial_number:x}.crt")
    if not kept.exists():
        os.link(cert_path, kept)
    _issue_leaf(
        issuer,
        cert_path.parent,
        stem,
        kind,
        identity,
        algorithm,
        end,
        common_name=str(names[0].value) if names else None,
        extra_sans=extra,
    )
    return Renewal(
        kind,
        identity,
        cert_path,
        kept,
        old.serial_number,
        load_certs(cert_path)[0].not_valid_after_utc,  # as written: whole seconds
        capped,
        tuple(_general_name_text(n) for n in extra),
    )


def _names_beyond_profile(
    cert: x509.Certificate, kind: CertificateKind, identity: Identity
) -> list[x509.GeneralName]:
    """The subject alternative names of ``cert`` that a new certificate of its kind and
    identity would not get anyway, in their order."""
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []
    profile: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    if kind == "tls":
        profile.extend(_LOOPBACK_SANS)
    extra: list[x509.GeneralName] = []
    for n in names:
        if n not in profile and n not in extra:  # a name twice is kept once
            extra.append(n)
    return extra


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    kinds = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.UniformResourceIdentifier: "URI",
        x509.RFC822Name: "email",
    }
    return f"{kinds.get(type(name), type(name).__name__)}:{name.value}"


def _one_line(text: str) -> str:
    """Text fit for a comment of a line-based file: no line break or control character."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def revocation_file_lines(data: bytes) -> list[str]:
    """The lines of a revocation file as the hub reads them: UTF-8 (a leading BOM dropped;
    a comment typed in another encoding decodes to replacement characters, never to a hex
    digit), split at line feeds only (``str.splitlines`` also splits at form feeds, NEL
    and U+2028, which a comment may hold: its rest would read as a serial)."""
    text = data.decode("utf-8-sig", errors="replace")
    return [line.removesuffix("\r") for line in text.split("\n")]


def rfc3339_time(text: str) -> dt.datetime:
    """An RFC 3339 date and time with its offset (2026-03-01T00:00:00Z, ...+03:30) in UTC;
    ValueError for anything else (a date alone, a time with no offset: whose midnight?)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in text.upper():
        raise ValueError(
            f"{text!r} is not an RFC 3339 time with its offset (e.g. 2026-03-01T00:00:00Z)"
        )
    return when.astimezone(dt.UTC)


def revocation_entry(line: str) -> tuple[str, dt.datetime | None] | None:
    """One line of a revocation file: its serial (hexadecimal, lowercase, no 0x) and the
    time it is revoked from (None: for all time); None for a blank or comment line.
    ValueError says what is wrong with the line."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    serial = words[0].lower().removeprefix("0x")
    try:
        int(serial, 16)
    except ValueError:
        raise ValueError(f"{line!r} is not a hexadecimal serial") from None
    if len(words) > 2:
        raise ValueError(f"{words[2]!r}: a line is a serial and at most a time ({line!r})")
    return serial, rfc3339_time(words[1]) if len(words) == 2 else None


def revoke_certificate(
    revocation_file: Path,
    cert_path: Path,
    *,
    note: str = "",
    since: dt.datetime | None = None,
) -> bool:
    """Lists the certificate's serial in the hub's revocation file (one hexadecimal serial a
    line, ``#`` comments), revoked for all time, or with ``since`` (aware) from that time on.
    The file is replaced whole, never missing or half written; a
    new one is made where none is, but not a directory for it: a path whose directory does
    not exist (a typo, the hub reading another file) raises FileNotFoundError.
    Returns False if the serial was listed already, for all time or from a time not later
    than ``since`` (the hub takes the earliest of a serial's lines)."""
    cert = load_certs(Path(cert_path))[0]
    serial = f"{cert.serial_number:x}"
    path = Path(revocation_file)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"no directory {path.parent} for the revocation file {path}: give the path the"
            " hub's revocation_file names; nothing written"
        )
    data = path.read_bytes() if path.exists() else b""
    for listed in revocation_file_lines(data):
        try:
            entry = revocation_entry(listed)
        except ValueError:  # the hub refuses it: not a listing of this serial
            continue
        if (
            entry is not None
            and int(entry[0], 16) == cert.serial_number
            and (entry[1] is None or (since is not None and entry[1] <= since))
        ):
            return False
    identity = identity_of_certificate(cert)
    # The subject and the note are anyone's text: a line break in either would write a
    # line of its own into the file (another serial, or one the hub cannot read).
    words = [str(identity) if identity else _one_line(cert.subject.rfc4514_string())]
    words.append(f"revoked {dt.datetime.now(dt.UTC):%Y-%m-%d}")
    if _one_line(note):
        words.append(_one_line(note))
    if data and not data.endswith(b"\n"):
        data += b"\n"
    when = "" if since is None else f" {since.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
    line = f"{serial}{when}  # {', '.join(words)}\n".encode()
    # What the file had, byte for byte, under the mode, owner and group the operator gave
    # it (the hub may read it through its group); a new file is 0644, less the umask.
    _write_new_files([(path, data + line, _CERT_MODE)], keep=True)
    return True
