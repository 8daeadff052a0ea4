"""Signing and verifying exact bytes: envelopes and evidence.

Both are signed over the DSSE pre-authentication encoding,
``PAE(type, payload) = "DSSEv1" SP len(type) SP type SP len(payload) SP payload``, so a
signature over one kind of message can never be replayed as another. The algorithm travels
with the signature (crypto agility) and must match the certificate's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from client_sdk import pb

__all__ = [
    "ENVELOPE_BATCH_PAYLOAD_TYPE",
    "ENVELOPE_PAYLOAD_TYPE",
    "EVIDENCE_BATCH_PAYLOAD_TYPE",
    "EVIDENCE_PAYLOAD_TYPE",
    "HUB_ATTESTATION_PAYLOAD_TYPE",
    "SignatureError",
    "Signer",
    "Verifier",
    "algorithm_of_key",
    "batch_tree_head",
    "key_id",
    "key_matches_certificate",
    "leaf_position",
    "load_private_key",
    "merkle_leaf",
    "merkle_paths_hold",
    "merkle_root_from_path",
    "merkle_tree",
    "pae",
    "sha256",
    "verify_signature",
]

ENVELOPE_PAYLOAD_TYPE = "chapar.envelope.v1"
ENVELOPE_BATCH_PAYLOAD_TYPE = "chapar.envelope-batch.v1"
EVIDENCE_PAYLOAD_TYPE = "chapar.evidence.v1"
EVIDENCE_BATCH_PAYLOAD_TYPE = "chapar.evidence-batch.v1"
HUB_ATTESTATION_PAYLOAD_TYPE = "chapar.hub-attestation.v1"  # ConnectWelcome.attestation
# Leaves per signed tree: bounds the proof an evidence or envelope carries (8 hashes at 256).
MAX_EVIDENCE_BATCH = 256
_MAX_TREE_SIZE = 1 << 32

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def leaf_position(key: PrivateKeyTypes, chain: Sequence[x509.Certificate]) -> int | None:
    """The 1-based place in ``chain`` of ``key``'s certificate (1: leaf first, as it must
    be), or None when it is in none: a chain concatenated the other way round is then
    named as such, not as another party's key."""
    return next((i for i, c in enumerate(chain, 1) if key_matches_certificate(key, c)), None)


def load_private_key(pem: bytes, source: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key ``pem`` read from ``source`` (a file name, or what
    the bytes are), any type; ValueError naming ``source`` otherwise, saying so when the
    key is encrypted (Chapar's servers and SDK take no passphrase: a key is protected by
    its file's mode, 0600)."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # with no password given, raised only for an encrypted key
        raise ValueError(
            f"{source} is encrypted (protected by a passphrase); Chapar reads unencrypted "
            "keys only, kept mode 0600 (openssl pkey -in KEY -out NEW writes it decrypted)"
        ) from None
    except ValueError as exc:
        raise ValueError(f"{source} is not a PEM private key: {exc}") from None


class SignatureError(Exception):
    """A signature does not verify; ``reason`` is an UPPER_SNAKE code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding of ``payload`` under ``payload_type``."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: the key id carried in signatures."""
    return sha256(cert.public_bytes(serialization.Encoding.DER))


def algorithm_of_key(key: PublicKey | PrivateKey) -> pb.SignatureAlgorithm.ValueType:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ED25519
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
    raise ValueError(f"unsupported signing key type {type(key).__name__}")


class Signer:
    """Signs with one private key and its certificate."""

    __slots__ = ("_sign", "algorithm", "certificate", "key_id")

    def __init__(self, private_key: PrivateKey, certificate: x509.Certificate) -> None:
        # The key's operation, chosen once: isinstance against cryptography's ABCs is slow.
        self._sign: Callable[[bytes], bytes]
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            self._sign = private_key.sign
        else:
            ec_key, ecdsa = private_key, ec.ECDSA(hashes.SHA256())
            self._sign = lambda data: ec_key.sign(data, ecdsa)
        self.certificate = certificate
        self.algorithm = algorithm_of_key(private_key)
        if algorithm_of_key(certificate.public_key()) != self.algorithm:  # type: ignore[arg-type]
            raise ValueError("the private key does not match the certificate")
        # The same algorithm is not the same key: another party's certificate (a mix-up of
        # files) would make every signature fail verification, found out only downstream.
        if not key_matches_certificate(private_key, certificate):
            raise ValueError("the private key does not match the certificate's public key")
        self.key_id = key_id(certificate)

    @classmethod
    def from_files(cls, key_path: Path, cert_path: Path) -> Signer:
        """Reads a PEM private key and its certificate (the first of the file); ValueError
        when the key is not the certificate's."""
        key = load_private_key(key_path.read_bytes(), str(key_path))
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: unsupported signing key type")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cls(key, cert)

    def sign(self, payload_type: str, payload: bytes) -> pb.Signature:
        value = self._sign(pae(payload_type, payload))
        return pb.Signature(algorithm=self.algorithm, key_id=self.key_id, value=value)

    def seal_evidence(self, items: Sequence[pb.Evidence]) -> None:
        """Signs evidence built unsigned (content only) in place, as ``sign_evidence``."""
        self._seal(
            items, EVIDENCE_PAYLOAD_TYPE, EVIDENCE_BATCH_PAYLOAD_TYPE, [e.content for e in items]
        )

    def sign_evidence(self, contents: Sequence[bytes]) -> list[pb.Evidence]:
        """Signs evidence contents: one alone, several as Merkle batches of one signature.

        Each returned evidence verifies on its own (see ``Evidence`` in evidence.proto).
        """
        items = [pb.Evidence() for _ in contents]
        for item, content in zip(items, contents, strict=True):
            item.content = content
        self._seal(items, EVIDENCE_PAYLOAD_TYPE, EVIDENCE_BATCH_PAYLOAD_TYPE, contents)
        return items

    def seal_envelopes(self, envelopes: Sequence[pb.Envelope]) -> None:
        """Signs envelopes built unsigned (header and body) in place: one alone, several as
        Merkle batches of one signature (see ``Envelope`` in envelope.proto)."""
        self._seal(
            envelopes,
            ENVELOPE_PAYLOAD_TYPE,
            ENVELOPE_BATCH_PAYLOAD_TYPE,
            [e.header for e in envelopes],
        )

    def _seal(
        self,
        items: Sequence[pb.Envelope | pb.Evidence],
        single_type: str,
        batch_type: str,
        payloads: Sequence[bytes],
    ) -> None:
        """Sets each item's signature and inclusion proof over its payload: one payload is
        signed alone under ``single_type`` (no proof); several are the leaves of Merkle
        trees of at most MAX_EVIDENCE_BATCH, each tree head signed once under
        ``batch_type``. Set field by field, in place: made apart with protobuf's keyword
        arguments and copied in, they cost about half as much again."""
        algorithm, key = self.algorithm, self.key_id
        if len(payloads) == 1:
            (item,) = items
            signature = item.signature
            signature.algorithm = algorithm
            signature.key_id = key
            signature.value = self._sign(pae(single_type, payloads[0]))
            item.ClearField("batch_proof")
            return
        for start in range(0, len(payloads), MAX_EVIDENCE_BATCH):
            chunk = payloads[start : start + MAX_EVIDENCE_BATCH]
            size = len(chunk)
            root, paths = merkle_tree([merkle_leaf(c) for c in chunk])
            value = self._sign(pae(batch_type, batch_tree_head(size, root)))
            members = items[start : start + MAX_EVIDENCE_BATCH]
            for i, (item, path) in enumerate(zip(members, paths, strict=True)):
                signature = item.signature
                signature.algorithm = algorithm
                signature.key_id = key
                signature.value = value
                proof = item.batch_proof
                proof.tree_size = size
                proof.leaf_index = i
                hashes = proof.path
                if hashes:  # sealed before: replaced, as CopyFrom would
                    del hashes[:]
                hashes.extend(path)


class Verifier:
    """Checks signatures against one certificate's public key (parsed once, reused)."""

    __slots__ = ("_check", "algorithm", "key_id")

    def __init__(self, cert: x509.Certificate) -> None:
        self.key_id = key_id(cert)
        public_key = cert.public_key()
        if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise SignatureError("SIGNATURE_ALGORITHM_MISMATCH", "unsupported certificate key type")
        try:
            self.algorithm = algorithm_of_key(public_key)
        except ValueError as exc:
            raise SignatureError("SIGNATURE_ALGORITHM_MISMATCH", str(exc)) from exc
        # The key's check, chosen once: isinstance against cryptography's key ABCs is slow.
        self._check: Callable[[bytes, bytes], None]
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            self._check = public_key.verify
        else:
            ec_key, ecdsa = public_key, ec.ECDSA(hashes.SHA256())
            self._check = lambda value, data: ec_key.verify(value, data, ecdsa)

    def verify(self, payload_type: str, payload: bytes, signature: pb.Signature) -> None:
        """Raises SignatureError unless ``signature`` over ``payload`` is valid for the key."""
        if signature.key_id != self.key_id:
            raise SignatureError(
                "SIGNATURE_KEY_MISMATCH", "signature key id does not match the certificate"
            )
        if signature.algorithm != self.algorithm:
            raise SignatureError(
                "SIGNATURE_ALGORITHM_MISMATCH",
                "signature algorithm does not match the certificate key",
            )
        data = pae(payload_type, payload)
        try:
            self._check(signature.value, data)
        except InvalidSignature as exc:
            raise SignatureError("SIGNATURE_INVALID", "signature does not verify") from exc


def verify_signature(
    cert: x509.Certificate, payload_type: str, payload: bytes, signature: pb.Signature
) -> None:
    """Raises SignatureError unless ``signature`` over ``payload`` is valid for ``cert``."""
    Verifier(cert).verify(payload_type, payload, signature)


# -- Merkle batches (RFC 9162 section 2.1) -------------------------------------------------


def merkle_leaf(content: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + content).digest()


def merkle_tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root of the tree over ``leaves`` (leaf hashes) and each leaf's audit path.

    Built level by level: a level's unpaired last node moves up unchanged, which gives
    RFC 9162's tree (split at the largest power of two below n) without recursion.
    """
    n = len(leaves)
    if n == 0:
        raise ValueError("a Merkle tree needs at least one leaf")
    sha = hashlib.sha256
    paths: list[list[bytes]] = [[] for _ in range(n)]
    # Which node of the current level each leaf sits under: leaves of one node share it.
    under = list(range(n))
    level = list(leaves)
    while len(level) > 1:
        size = len(level)
        for leaf, node in enumerate(under):
            sibling = node ^ 1
            if sibling < size:
                paths[leaf].append(level[sibling])
            under[leaf] = node >> 1
        level = [
            sha(b"\x01" + level[i] + level[i + 1]).digest() if i + 1 < size else level[i]
            for i in range(0, size, 2)
        ]
    return level[0], paths


def merkle_paths_hold(leaves: Sequence[bytes], paths: Sequence[Sequence[bytes]]) -> bytes | None:
    """The root over ``leaves`` (every leaf hash of one tree, in order) when each
    ``paths[i]`` is exactly leaf i's audit path in it, else None.

    For a whole batch this proves what ``merkle_root_from_path`` would for each member,
    with one hash a leaf instead of one a leaf and level. None only means "not shown
    here": a caller checks the members one by one then.
    """
    if len(leaves) != len(paths):
        return None
    root, expected = merkle_tree(leaves)
    for got, want in zip(paths, expected, strict=True):
        if got != want:
            return None
    return root


def merkle_root_from_path(
    leaf: bytes, index: int, size: int, path: Sequence[bytes]
) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2), or None if it is malformed."""
    if not 0 <= index < size <= _MAX_TREE_SIZE:
        return None
    sha = hashlib.sha256
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0 or len(p) != 32:
            return None
        if fn & 1 or fn == sn:
            r = sha(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def batch_tree_head(size: int, root: bytes) -> bytes:
    """What a batch signature covers (inside PAE): the tree size and its root."""
    return size.to_bytes(8, "big") + root
