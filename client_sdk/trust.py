"""Offline verification: certificate chains, letters and evidence.

An auditor needs only the root CA certificate(s) plus the certificates that travel with a
letter (``GetEnvelopeResponse.certificates``) to check every signature of a letter's
evidence chain. Nodes and the hub use the same code for what they receive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from client_sdk import pb
from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import (
    ENVELOPE_BATCH_PAYLOAD_TYPE,
    ENVELOPE_PAYLOAD_TYPE,
    EVIDENCE_BATCH_PAYLOAD_TYPE,
    EVIDENCE_PAYLOAD_TYPE,
    SignatureError,
    Verifier,
    batch_tree_head,
    key_id,
    merkle_leaf,
    merkle_paths_hold,
    merkle_root_from_path,
    sha256,
)

__all__ = [
    "CertificateUsage",
    "TrustStore",
    "VerificationError",
    "chain_break",
    "check_attestation",
    "datetime_of",
    "is_ca",
    "load_pem_certificates",
    "revocations_of",
    "seconds_of",
    "set_timestamp",
    "valid_timestamp",
]

CertificateUsage = Literal["signing", "tls"]
_MAX_CHAIN = 4


class VerificationError(Exception):
    """Something does not verify; ``reason`` is an UPPER_SNAKE code (an ErrorInfo reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_pem_certificates(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


# The most CA certificates not held yet that one add_certificates call looks at: an honest
# bundle, directory or welcome carries the exchange's few; a flood of forged ones (anyone's
# to make, each a signature check to turn away) is cut here.
_MAX_NEW_CAS = 64


@dataclass
class TrustStore:
    """Root CAs, known intermediates, known signing certificates and revoked serials.

    A revoked serial is revoked for all time, or, when ``revoked_since`` gives it a time,
    from that time on (a key retired, not stolen: what it signed before still verifies).
    Each check asks as of its own moment: a signature as of its letter's ``create_time``
    or its evidence's ``event_time``, a live check (a connection, a call) as of now.

    Chain checks are cached per certificate (by key id), so verifying many letters from
    the same agency costs one signature check each, not three.
    """

    roots: list[x509.Certificate]
    intermediates: list[x509.Certificate] = field(default_factory=list)
    revoked_serials: set[int] = field(default_factory=set)
    # Those of ``revoked_serials`` revoked only from a time on (aware datetimes).
    revoked_since: dict[int, dt.datetime] = field(default_factory=dict)
    _by_key_id: dict[bytes, x509.Certificate] = field(default_factory=dict)
    _verifiers: dict[bytes, Verifier] = field(default_factory=dict)
    _batch_heads: OrderedDict[tuple[bytes, str, int, bytes, bytes], None] = field(
        default_factory=OrderedDict
    )
    _chain_ok: dict[tuple[bytes, CertificateUsage], _Verified] = field(default_factory=dict)
    # Called after every ``set_revoked``: what holds calls admitted before (a server's
    # side-service streams, node.rpc.side) checks them again.
    revocation_listeners: list[Callable[[], None]] = field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def from_pem_files(cls, roots: Path, intermediates: Path | None = None) -> TrustStore:
        store = cls(load_pem_certificates(roots))
        if intermediates is not None:
            store.intermediates.extend(load_pem_certificates(intermediates))
        return store

    def add_certificates(self, certs: Iterable[x509.Certificate | bytes]) -> None:
        """Adds certificates (DER bytes or objects): CA ones as intermediates, others by key id.

        A CA certificate is kept only once its signature is a held CA's (a root's, or one
        kept before, in any order among ``certs``); others are dropped. Chain building takes
        the first issuer whose key verifies a certificate, so a copy of an intermediate
        with a broken signature (same name and key), kept from one hostile bundle, made
        every later chain through that intermediate fail ``CERTIFICATE_UNTRUSTED``. At most
        ``_MAX_NEW_CAS`` CA certificates not held yet are looked at a call (an exchange has a
        few; each costs a signature check)."""
        # A set, not a scan of the list per certificate: a bundle or a welcome of many CA
        # certificates (anyone's to make) took time in the square of their number.
        known = set(self.intermediates)
        roots = set(self.roots)
        waiting: dict[x509.Certificate, None] = {}
        for item in certs:
            cert = x509.load_der_x509_certificate(item) if isinstance(item, bytes) else item
            if is_ca(cert):
                if cert in known:
                    continue
                if cert in roots:
                    # Trusted as it is (an intermediate given in tls.ca is taken as a root)
                    # and kept as an intermediate too: what a hub holds there is what its
                    # directory publishes, and so what bundles carry to be verified with
                    # the root CA alone.
                    known.add(cert)
                    self.intermediates.append(cert)
                elif len(waiting) < _MAX_NEW_CAS:
                    waiting[cert] = None
            else:
                kid = key_id(cert)
                self._by_key_id[kid] = cert
                self._verifiers.pop(kid, None)
        while waiting:  # a round a level of CAs: each checked once a round
            signed = [cert for cert in waiting if self._issued_by_held_ca(cert)]
            if not signed:
                break
            for cert in signed:
                del waiting[cert]
                self.intermediates.append(cert)

    def _issued_by_held_ca(self, cert: x509.Certificate) -> bool:
        return any(_signed_by(cert, ca) for ca in (*self.roots, *self.intermediates))

    def certificate(self, kid: bytes) -> x509.Certificate | None:
        return self._by_key_id.get(kid)

    def snapshot(self) -> TrustStore:
        """A store of its own with this one's roots, CA certificates and revoked serials
        (added to or changed without touching this one); no caches, no listeners."""
        return TrustStore(
            list(self.roots),
            list(self.intermediates),
            set(self.revoked_serials),
            dict(self.revoked_since),
        )

    def set_revoked(
        self, serials: Iterable[int], since: Mapping[int, dt.datetime] | None = None
    ) -> None:
        """Replaces the revocations: each of ``serials`` revoked for all time, unless
        ``since`` gives it a time (aware), from which on it is revoked; a serial ``since``
        gives alone is revoked from its time too."""
        since = dict(since or {})
        self.revoked_serials = set(serials) | set(since)
        self.revoked_since = since
        for listener in self.revocation_listeners:
            listener()

    def add_revoked(
        self, serials: Iterable[int], since: Mapping[int, dt.datetime] | None = None
    ) -> None:
        """Adds revocations (as ``set_revoked`` reads them) to those held: of two for one
        serial, the one revoking earlier counts (one for all time over any time)."""
        given = dict(since or {})
        forever = (self.revoked_serials - self.revoked_since.keys()) | (set(serials) - given.keys())
        times = dict(self.revoked_since)
        for serial, when in given.items():
            times[serial] = min(times.get(serial, when), when)
        self.set_revoked(forever, {s: t for s, t in times.items() if s not in forever})

    def revoked_at(self, serial: int, when: dt.datetime) -> bool:
        """Whether ``serial`` is revoked at ``when`` (listed, with no time or one not after it)."""
        if serial not in self.revoked_serials:
            return False
        since = self.revoked_since.get(serial)
        return since is None or since <= when

    def chain_revoked(self, cert: x509.Certificate, at: dt.datetime | None = None) -> bool:
        """Whether ``cert`` or a CA above it (as this store holds them) is revoked at ``at``
        (now when not given). Only that: no validity, usage or identity is asked (health,
        reflection and ``/metrics`` serve any other certificate of the CA: an operator's
        scraper has no identity)."""
        when = at or dt.datetime.now(dt.UTC)
        current = cert
        for _ in range(_MAX_CHAIN):
            if self.revoked_at(current.serial_number, when):
                return True
            issuer = next(
                (ca for ca in (*self.intermediates, *self.roots) if _signed_by(current, ca)), None
            )
            if issuer is None or issuer == current:
                return False
            current = issuer
        return False

    def verify_certificate(
        self,
        cert: x509.Certificate,
        usage: CertificateUsage,
        at: dt.datetime | None = None,
        *,
        kid: bytes | None = None,
    ) -> Identity:
        """Checks chain to a root, validity at ``at``, key usage and revocation at ``at``
        (of every certificate of the chain, the root it ends at included, on every call).

        Returns the certificate's Chapar identity. ``kid``: the certificate's key id when the
        caller already knows it (it found the certificate by it).
        """
        when = at or dt.datetime.now(dt.UTC)
        if when.tzinfo is None:
            raise VerificationError("BAD_TIME", "verification time must be timezone-aware")
        kid = kid or key_id(cert)
        cached = self._chain_ok.get((kid, usage))
        if cached is not None and cached.start <= when <= cached.end:
            # Revocation is checked on every use, so a serial revoked after caching still counts.
            if self.revoked_serials.isdisjoint(cached.serials) or not any(
                self.revoked_at(serial, when) for serial in cached.serials
            ):
                return cached.identity
            raise VerificationError("CERTIFICATE_REVOKED", "a certificate of the chain is revoked")
        identity = identity_of_certificate(cert)
        if identity is None:
            raise VerificationError("CERTIFICATE_NO_IDENTITY", "certificate has no Chapar SAN URI")
        _check_usage(cert, usage)
        chain = [cert]
        current = cert
        for _ in range(_MAX_CHAIN):
            if self.revoked_at(current.serial_number, when):
                raise VerificationError(
                    "CERTIFICATE_REVOKED", f"certificate {current.serial_number:x} is revoked"
                )
            if not _valid_at(current, when):
                raise VerificationError(
                    "CERTIFICATE_EXPIRED", "certificate not valid at the time of use"
                )
            cas_below = len(chain) - 1  # CA certificates between the leaf and the issuer
            root = self._issuer_in(current, self.roots, cas_below, when)
            if root is not None:
                chain.append(root)
                # The anchor too, as the cached path does: a revoked CA (its key compromised)
                # would otherwise admit every certificate it mints at that one's first check.
                if self.revoked_at(root.serial_number, when):
                    raise VerificationError(
                        "CERTIFICATE_REVOKED", f"CA certificate {root.serial_number:x} is revoked"
                    )
                if not _valid_at(root, when):
                    raise VerificationError(
                        "CERTIFICATE_EXPIRED", "root CA not valid at the time of use"
                    )
                verified = _Verified(
                    identity,
                    max(c.not_valid_before_utc for c in chain),
                    min(c.not_valid_after_utc for c in chain),
                    frozenset(c.serial_number for c in chain),
                )
                self._chain_ok[(kid, usage)] = verified
                return identity
            issuer = self._issuer_in(current, self.intermediates, cas_below, when)
            if issuer is None:
                raise VerificationError(
                    "CERTIFICATE_UNTRUSTED", "certificate does not chain to a trusted root"
                )
            chain.append(issuer)
            current = issuer
        raise VerificationError("CERTIFICATE_UNTRUSTED", "certificate chain too long")

    @staticmethod
    def _issuer_in(
        cert: x509.Certificate,
        candidates: list[x509.Certificate],
        cas_below: int,
        when: dt.datetime,
    ) -> x509.Certificate | None:
        # Those valid at ``when`` first: a CA certified again under the same name and key
        # (its old certificate expired, or not yet valid) has both in the store, and either
        # verifies the signature; the one of the time of use is the one that counts.
        ordered = sorted(candidates, key=lambda c: not _valid_at(c, when))
        for candidate in ordered:
            if (
                candidate.subject == cert.issuer
                and _may_issue(candidate, cas_below)
                and _signed_by(cert, candidate)
            ):
                return candidate
        return None

    def _signer(self, signature: pb.Signature, at: dt.datetime) -> tuple[Verifier, Identity]:
        kid = signature.key_id
        cert = self._by_key_id.get(kid)
        if cert is None:
            raise VerificationError(
                "SIGNER_UNKNOWN", "no known certificate for the signature's key id"
            )
        identity = self.verify_certificate(cert, "signing", at, kid=kid)
        verifier = self._verifiers.get(kid)
        if verifier is None:
            try:
                verifier = self._verifiers[kid] = Verifier(cert)
            except SignatureError as exc:
                raise VerificationError(exc.reason, str(exc)) from exc
        return verifier, identity

    def verify_signed(
        self,
        payload_type: str,
        payload: bytes,
        signature: pb.Signature,
        at: dt.datetime | None = None,
    ) -> Identity:
        """Verifies one signature over ``payload`` (a known signing key whose certificate
        chains to a root, valid at ``at``, not revoked); returns the signer's identity."""
        verifier, identity = self._signer(signature, at or dt.datetime.now(dt.UTC))
        try:
            verifier.verify(payload_type, payload, signature)
        except SignatureError as exc:
            raise VerificationError(exc.reason, str(exc)) from exc
        return identity

    def verify_envelope(
        self,
        envelope: pb.Envelope,
        at: dt.datetime | None = None,
        *,
        check_body: bool = True,
        as_created: bool = False,
    ) -> pb.EnvelopeHeader:
        """Verifies signature, signer identity and body digest, then parses the header: as
        of ``at``, or with ``as_created`` as of the header's ``create_time``, or now."""
        return self._verify_envelope(envelope, at, check_body, None, as_created)

    def verify_envelopes(
        self,
        envelopes: Sequence[pb.Envelope],
        *,
        check_body: bool = True,
        as_created: bool = False,
    ) -> list[pb.EnvelopeHeader | VerificationError]:
        """``verify_envelope`` for each envelope, in order, each failure returned in its
        place: as of now, or with ``as_created`` as of each header's ``create_time`` (a
        letter the hub relayed, which checked it as of then, stays valid after its signer's
        certificate expires; so does a revocation from a time after it). Whole batches among
        them have their inclusion proofs checked together (see ``merkle_paths_hold``); the
        outcome is the same as one by one."""
        roots = _whole_batch_roots([(e.header, e) for e in envelopes])
        out: list[pb.EnvelopeHeader | VerificationError] = []
        for i, envelope in enumerate(envelopes):
            try:
                out.append(
                    self._verify_envelope(envelope, None, check_body, roots.get(i), as_created)
                )
            except VerificationError as exc:
                out.append(exc)
        return out

    def _verify_envelope(
        self,
        envelope: pb.Envelope,
        at: dt.datetime | None,
        check_body: bool,
        root: bytes | None,
        as_created: bool = False,
    ) -> pb.EnvelopeHeader:
        header: pb.EnvelopeHeader | None = None
        when = at
        if when is None and as_created:  # its time read first; nothing else used unsigned
            with contextlib.suppress(DecodeError):  # said below, after the signature
                header = pb.EnvelopeHeader.FromString(envelope.header)
                when = _created(header)
        verifier, identity = self._signer(envelope.signature, when or dt.datetime.now(dt.UTC))
        self._check_signed(verifier, ENVELOPE_PAYLOAD_TYPE, envelope.header, envelope, root)
        if header is None:
            try:
                header = pb.EnvelopeHeader.FromString(envelope.header)
            except DecodeError as exc:
                raise VerificationError(
                    "HEADER_MALFORMED", "header bytes are not an EnvelopeHeader"
                ) from exc
        if identity.kind != "agency" or identity.agency != header.sender.agency:
            raise VerificationError(
                "SENDER_MISMATCH", f"letter from {header.sender.agency} signed by {identity.uri}"
            )
        if check_body and (
            header.body_sha256 != sha256(envelope.body) or header.body_size != len(envelope.body)
        ):
            raise VerificationError("BODY_DIGEST_MISMATCH", "body does not match the signed digest")
        return header

    def verify_evidence(self, evidence: pb.Evidence) -> pb.EvidenceContent:
        """Verifies an evidence's signature and that its signer is its stated issuer."""
        return self._verify_evidence(evidence, None)

    def verify_evidence_many(
        self, evidence: Sequence[pb.Evidence]
    ) -> list[pb.EvidenceContent | VerificationError]:
        """``verify_evidence`` for each item, in order, each failure returned in its place.
        Whole batches among them have their inclusion proofs checked together (see
        ``merkle_paths_hold``); the outcome is the same as one by one."""
        roots = _whole_batch_roots([(e.content, e) for e in evidence])
        out: list[pb.EvidenceContent | VerificationError] = []
        for i, item in enumerate(evidence):
            try:
                out.append(self._verify_evidence(item, roots.get(i)))
            except VerificationError as exc:
                out.append(exc)
        return out

    def _verify_evidence(self, evidence: pb.Evidence, root: bytes | None) -> pb.EvidenceContent:
        try:
            content = pb.EvidenceContent.FromString(evidence.content)
        except DecodeError as exc:
            raise VerificationError("EVIDENCE_MALFORMED", "evidence content is malformed") from exc
        if content.HasField("event_time") and not valid_timestamp(content.event_time):
            raise VerificationError("EVIDENCE_MALFORMED", "evidence event_time is not a valid time")
        when = datetime_of(content.event_time) if content.HasField("event_time") else None
        verifier, identity = self._signer(evidence.signature, when or dt.datetime.now(dt.UTC))
        self._check_signed(verifier, EVIDENCE_PAYLOAD_TYPE, evidence.content, evidence, root)
        if identity.uri != content.issuer:
            raise VerificationError(
                "ISSUER_MISMATCH",
                f"evidence says issuer {content.issuer} but {identity.uri} signed it",
            )
        return content

    def _check_signed(
        self,
        verifier: Verifier,
        payload_type: str,
        payload: bytes,
        signed: pb.Envelope | pb.Evidence,
        root: bytes | None,
    ) -> None:
        """Checks ``signed``'s signature over ``payload``: alone, or as a batch member
        (``root``: where its inclusion proof leads, if ``_whole_batch_roots`` showed it)."""
        try:
            if signed.HasField("batch_proof"):
                self._verify_batch_member(
                    verifier,
                    _BATCH_TYPE[payload_type],
                    payload,
                    signed.signature,
                    signed.batch_proof,
                    root,
                )
            else:
                verifier.verify(payload_type, payload, signed.signature)
        except SignatureError as exc:
            raise VerificationError(exc.reason, str(exc)) from exc

    def _verify_batch_member(
        self,
        verifier: Verifier,
        batch_type: str,
        payload: bytes,
        signature: pb.Signature,
        proof: pb.BatchInclusionProof,
        root: bytes | None,
    ) -> None:
        """Checks the inclusion proof (unless ``root`` says where it was shown to lead),
        then the tree head's signature (once per batch)."""
        if root is None:
            root = merkle_root_from_path(
                merkle_leaf(payload), proof.leaf_index, proof.tree_size, list(proof.path)
            )
        if root is None:
            reason = "EVIDENCE" if batch_type == EVIDENCE_BATCH_PAYLOAD_TYPE else "ENVELOPE"
            raise SignatureError(
                f"{reason}_PROOF_INVALID", "the batch inclusion proof is malformed"
            )
        head = batch_tree_head(proof.tree_size, root)
        # A signature that verified once over these exact bytes with this key verifies again:
        # the cache saves the public-key operation, never a check (revocation and validity
        # of the signer are checked on every call, above). The payload type is part of the
        # key: an envelope batch's head never stands for an evidence batch's.
        seen = (verifier.key_id, batch_type, signature.algorithm, signature.value, head)
        if seen in self._batch_heads:
            self._batch_heads.move_to_end(seen)
            return
        verifier.verify(batch_type, head, signature)
        self._batch_heads[seen] = None
        if len(self._batch_heads) > _BATCH_HEADS_KEPT:
            self._batch_heads.popitem(last=False)


_E = pb.EvidenceEvent
# Who may attest what: a signature proves who signed; this says whether that signer's word
# counts for the event (ETSI EN 319 522: the sender's service accepts the submission, the
# relay relays or expires, the recipient's service delivers and hands over).
_BY_SENDER = frozenset(
    {_E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, _E.EVIDENCE_EVENT_SUBMISSION_REJECTION}
)
_BY_HUB = frozenset(
    {
        _E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        _E.EVIDENCE_EVENT_RELAY_REJECTION,
        _E.EVIDENCE_EVENT_RELAY_FAILURE,
        _E.EVIDENCE_EVENT_EXPIRY,
    }
)
_BY_RECIPIENT = frozenset(
    {_E.EVIDENCE_EVENT_DELIVERY, _E.EVIDENCE_EVENT_DELIVERY_FAILURE, _E.EVIDENCE_EVENT_HANDOVER}
)


@functools.lru_cache(maxsize=1024)
def _issuer(uri: str) -> Identity | None:
    """An issuer's parsed identity (a few issuers sign every evidence: parsed once each)."""
    try:
        return Identity.parse(uri)
    except ValueError:
        return None


def check_attestation(
    content: pb.EvidenceContent,
    *,
    sender: str | None = None,
    recipients: Collection[str] | None = None,
    hubs: Collection[str] | None = None,
) -> None:
    """That the evidence's (verified) issuer may attest its event: the sender's agency a
    submission, a hub a relay or an expiry, the agency it names as ``recipient`` a delivery
    or a handover. With the letter's ``sender`` and ``recipients`` (agency codes), also that
    it names them; with ``hubs`` (identity URIs, or one URI), that a relay or an expiry is
    by one of those hubs, not by any hub the CA certified (a staging hub). Otherwise
    ``VerificationError`` ``ISSUER_NOT_ALLOWED``: an agency's signature on a HANDOVER it
    claims for another, or on a relay, proves nothing.
    """
    if isinstance(hubs, str):  # one URI (a str is a Collection[str], of its characters)
        hubs = (hubs,)
    issuer = _issuer(content.issuer)
    event, named = content.event, content.recipient
    not_the_hub = ""
    if issuer is None:
        allowed = False
    elif event in _BY_SENDER:
        allowed = issuer.kind == "agency" and sender in (None, issuer.agency)
    elif event in _BY_HUB:
        if hubs is not None and content.issuer not in hubs:
            not_the_hub = f": the hub is {' or '.join(sorted(hubs)) or 'none given'}"
        allowed = issuer.kind == "hub" and not not_the_hub
    elif event in _BY_RECIPIENT:
        allowed = issuer.kind == "agency" and bool(named) and issuer.agency == named
    else:
        allowed = False
    if allowed and named and recipients is not None and named not in recipients:
        allowed = False
    if not allowed:
        raise VerificationError(
            "ISSUER_NOT_ALLOWED",
            f"{content.issuer} may not attest "
            + (_E.Name(event) if event in _E.values() else f"event {event}")
            + (f" for {named}" if named else "")
            + not_the_hub,
        )


def revocations_of(
    serials: Iterable[str], timed: Iterable[pb.Revocation] = ()
) -> tuple[set[int], dict[int, dt.datetime]]:
    """A directory's, a ``ListAgencies`` answer's or a bundle's revocations as
    ``TrustStore.set_revoked`` takes them: its ``revoked_serials`` (hexadecimal, every one)
    and the times its ``revocations`` give (the earliest of a serial given twice; one given
    there with no time is revoked for all time). ValueError for a serial that is not
    hexadecimal or a time that is none."""
    forever = {int(serial, 16) for serial in serials}
    since: dict[int, dt.datetime] = {}
    untimed: set[int] = set()
    for revocation in timed:
        serial = int(revocation.serial, 16)
        if not revocation.HasField("since"):
            untimed.add(serial)
        elif not valid_timestamp(revocation.since):
            raise ValueError(f"the revocation of {revocation.serial} has no valid time")
        else:
            when = datetime_of(revocation.since)
            since[serial] = min(since.get(serial, when), when)
    for serial in untimed:
        since.pop(serial, None)
    return forever | untimed, since


def _whole_batch_roots(
    members: Sequence[tuple[bytes, pb.Envelope | pb.Evidence]],
) -> dict[int, bytes]:
    """For members (payload, signed) that make up a whole batch here, every leaf of one
    signed tree exactly once, the root their inclusion proofs lead to, by member index.

    A member of no whole batch, or of one whose proofs do not all hold, is absent: it is
    checked on its own, which finds its fault. Grouped by signature value and tree size,
    which a batch's members share; the signature itself is checked afterwards, as always.
    """
    groups: dict[tuple[bytes, int], list[int]] = {}
    for i, (_, signed) in enumerate(members):
        if signed.HasField("batch_proof"):
            key = (signed.signature.value, signed.batch_proof.tree_size)
            groups.setdefault(key, []).append(i)
    roots: dict[int, bytes] = {}
    for (_, size), indices in groups.items():
        if size < 2 or len(indices) != size:
            continue
        order: list[int] = [-1] * size
        for i in indices:
            at = members[i][1].batch_proof.leaf_index
            if at >= size or order[at] >= 0:
                break
            order[at] = i
        else:
            root = merkle_paths_hold(
                [merkle_leaf(members[i][0]) for i in order],
                [members[i][1].batch_proof.path for i in order],
            )
            if root is not None:
                roots.update(dict.fromkeys(indices, root))
    return roots


_BATCH_HEADS_KEPT = 4096
# The payload type a batch of each kind is signed under.
_BATCH_TYPE = {
    ENVELOPE_PAYLOAD_TYPE: ENVELOPE_BATCH_PAYLOAD_TYPE,
    EVIDENCE_PAYLOAD_TYPE: EVIDENCE_BATCH_PAYLOAD_TYPE,
}


@dataclass(frozen=True, slots=True)
class _Verified:
    """A verified chain: the leaf's identity, when the whole chain is valid, its serials."""

    identity: Identity
    start: dt.datetime
    end: dt.datetime
    serials: frozenset[int]


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``cert``: its name is the issuer's and its key verifies the
    signature (a key that cannot be read, or another issuer's, does not)."""
    if ca.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_break(
    chain: Sequence[x509.Certificate], anchors: Collection[x509.Certificate]
) -> str | None:
    """Why ``chain`` (leaf first, then the CA certificates sent with it) does not lead to a
    certificate of ``anchors`` (a CA bundle), in words naming the issuer missing from both
    (or given, but of another key than the one that signed); None when it does. Only names and signatures are followed: validity, usage and
    revocation are the handshake's and ``TrustStore.verify_certificate``'s. A file missing
    its intermediate is so named at load, not left to a handshake that fails as UNAVAILABLE."""
    current, seen = chain[0], {chain[0]}
    while current not in anchors and not any(_signed_by(current, ca) for ca in anchors):
        issuer = next((c for c in chain if c not in seen and _signed_by(current, c)), None)
        if issuer is None:
            subject, name = current.subject.rfc4514_string(), current.issuer.rfc4514_string()
            if current.issuer == current.subject:
                return f'"{subject}" is self-signed and not one of them'
            if any(c.subject == current.issuer for c in (*chain, *anchors)):
                # One of that name is given, but its key did not sign (a CA renewed with
                # a new key, the file holding the old certificate): not "missing".
                return (
                    f'the certificate of "{name}" given is not the issuer of "{subject}"'
                    " (another key: a renewed CA's old certificate?)"
                )
            return f'no certificate of "{name}", the issuer of "{subject}", is in either'
        seen.add(issuer)
        current = issuer
    return None


def _may_issue(ca: x509.Certificate, cas_below: int) -> bool:
    """A CA with keyCertSign whose path length allows ``cas_below`` CAs under it."""
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca or not ku.key_cert_sign:
        return False
    return bc.path_length is None or cas_below <= bc.path_length


# google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31, nanos in [0, 1e9).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def datetime_of(ts: Timestamp) -> dt.datetime:
    """A valid Timestamp as an aware UTC datetime: what ``ToDatetime(tzinfo=dt.UTC)`` gives
    (microseconds, rounded toward zero), without its per-call cost. (timedelta's
    arguments by position: by keyword it takes a fifth to two fifths longer.)"""
    return _EPOCH + dt.timedelta(0, ts.seconds, ts.nanos // 1000)


def set_timestamp(ts: Timestamp, when: dt.datetime) -> None:
    """Sets ``ts`` to ``when`` (aware, or naive meaning UTC): what ``FromDatetime`` does,
    at a tenth of its cost (it goes through a time tuple and ``calendar.timegm``)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - _EPOCH
    ts.seconds = delta.days * 86_400 + delta.seconds
    ts.nanos = delta.microseconds * 1000


def seconds_of(ts: Timestamp) -> float:
    """A Timestamp as POSIX seconds (cheaper than ToDatetime().timestamp(), same value)."""
    return ts.seconds + ts.nanos / 1e9


def valid_timestamp(ts: Timestamp) -> bool:
    """True when ``ts`` is inside the range a Timestamp may hold (else it cannot convert)."""
    return _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is a CA certificate (basic constraints, CA true)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, when: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def _check_usage(cert: x509.Certificate, usage: CertificateUsage) -> None:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise VerificationError("CERTIFICATE_USAGE", "certificate has no key usage") from exc
    if is_ca(cert):
        raise VerificationError("CERTIFICATE_USAGE", "a CA certificate cannot be used directly")
    if usage == "signing":
        if not (ku.digital_signature and ku.content_commitment):
            raise VerificationError(
                "CERTIFICATE_USAGE", "not a signing certificate (contentCommitment)"
            )
        return
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise VerificationError(
            "CERTIFICATE_USAGE", "TLS certificate without extended key usage"
        ) from exc
    if x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in eku or ku.content_commitment:
        raise VerificationError("CERTIFICATE_USAGE", "not a TLS certificate")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _created(header: pb.EnvelopeHeader) -> dt.datetime | None:
    """The header's create_time, None when it has no valid one."""
    if not header.HasField("create_time") or not valid_timestamp(header.create_time):
        return None
    return datetime_of(header.create_time)
