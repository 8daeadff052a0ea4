"""The mutual-TLS material a back-end presents to its node, and the roots it trusts.

A back-end system authenticates with a client certificate whose SAN URI is
``urn:chapar:client:<CODE>:<NAME>``; the same root CA certificate that checks the node's TLS
certificate also anchors the offline verification of letters and evidence. Files are read
and checked once, here, so a wrong path or a mixed-up PEM fails with a clear message
instead of an opaque TLS handshake error.

Development PKI layout (``chapar pki``)::

    <pki>/ca/root.crt, <pki>/ca/intermediate.crt
    <pki>/agencies/<CODE>/{tls,signing,client}.{crt,key}
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import key_matches_certificate, leaf_position, load_private_key
from client_sdk.trust import TrustStore, chain_break, is_ca

__all__ = ["DEFAULT_CLIENT_NAME", "Credentials", "key_matches_certificate"]

DEFAULT_CLIENT_NAME = "backend"
# What Credentials' errors call its parts (ca, cert, key) when not read from files.
_ROLES = ("root certificates", "client certificate chain", "client private key")


@dataclass(frozen=True, slots=True)
class Credentials:
    """PEM root certificate(s), client private key and client certificate chain."""

    root_certificates: bytes
    private_key: bytes = field(repr=False)
    certificate_chain: bytes
    # from_files's files (ca, cert, key): its errors name them rather than their roles.
    _files: InitVar[tuple[Path, Path, Path] | None] = field(default=None, kw_only=True)

    def __post_init__(self, _files: tuple[Path, Path, Path] | None) -> None:
        ca, cert, key = _files or _ROLES
        roots = _load_certificates(self.root_certificates, str(ca))
        chain = _load_certificates(self.certificate_chain, str(cert))
        private = load_private_key(self.private_key, str(key))
        place = leaf_position(private, chain)
        if place is None:
            raise ValueError("client private key does not match the client certificate")
        if place > 1:  # the files concatenated the other way round: say so, not "not yours"
            raise ValueError(
                f"client certificate chain: the private key's certificate is number "
                f"{place} of {len(chain)}; it must come first, then its issuers (leaf first)"
            )
        # A chain that cannot reach the roots (its intermediate left out, another CA's) is
        # named with the issuer missing: the handshake would fail only as UNAVAILABLE.
        gap = chain_break(chain, roots)
        if gap is not None:
            of = ca if _files else "the root certificates"
            raise ValueError(f"{cert} does not chain to {of}: {gap}")

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> Credentials:
        """Reads the root CA, the client certificate chain and the client key (PEM); a key
        that cannot be read (encrypted, not PEM), or a chain that does not lead to a CA of
        ``ca`` (its intermediate left out), is named by its file."""
        ca, cert, key = Path(ca), Path(cert), Path(key)
        private_key = key.read_bytes()
        roots, chain = ca.read_bytes(), cert.read_bytes()
        return cls(roots, private_key, chain, _files=(ca, cert, key))

    @classmethod
    def from_pki(
        cls, pki_dir: Path, agency: str, *, client: str = DEFAULT_CLIENT_NAME
    ) -> Credentials:
        """Reads an agency's client credentials from a PKI directory.

        The default client (``backend``) is ``agencies/<CODE>/client.{crt,key}``; another
        client name ``NAME`` is looked up as ``agencies/<CODE>/client-NAME.{crt,key}``.
        """
        Identity.for_client(agency, client)  # validates both before they become paths
        pki = Path(pki_dir)
        stem = "client" if client == DEFAULT_CLIENT_NAME else f"client-{client}"
        folder = pki / "agencies" / agency
        return cls.from_files(
            pki / "ca" / "root.crt", folder / f"{stem}.crt", folder / f"{stem}.key"
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for ``grpc.aio.secure_channel``: our chain and key, their roots."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def identity(self) -> Identity | None:
        """The Chapar identity of the client certificate (the first of the chain)."""
        return identity_of_certificate(_load_certificates(self.certificate_chain, "chain")[0])

    def trust_store(self) -> TrustStore:
        """A TrustStore anchored at the root certificates, for verifying evidence.

        The CA certificates of our own chain are added as intermediates, so signing
        certificates from the same intermediate verify without fetching it.
        """
        store = TrustStore(_load_certificates(self.root_certificates, "root certificates"))
        chain = _load_certificates(self.certificate_chain, "client certificate chain")
        store.add_certificates(c for c in chain if is_ca(c))
        return store


def _load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{what}: not PEM certificates ({exc})") from None
    if not certs:
        raise ValueError(f"{what}: no certificate found")
    return certs
