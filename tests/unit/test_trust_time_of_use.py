"""When a signature counts: a letter is judged as of its signing, not as of its arrival.

SECURITY.md ("Known limits"): a letter is checked as of its ``create_time``, an evidence
as of its ``event_time``, "so that both stay verifiable after the signer's certificate
expires". The hub judged the letter below as of its own clock when it relayed it (the
signer's certificate valid then) and gave its sender RELAY_ACCEPTANCE; the offline
verifier accepts it; the recipient's node, which received it later from the hub's queue
(it was offline), must not refuse it because the certificate expired while it waited.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

from certs.pki import generate_key, init_pki, issue_certificate, load_certs, load_key
from client_sdk import pb
from client_sdk.client import _verify_as_created
from client_sdk.signing import Signer, sha256
from client_sdk.trust import TrustStore, set_timestamp
from node.rpc.hub_link import HubLink, _Session
from node.storage.node_store import StoredEvidence

SENDER = "000.00.00.G22"
ME = "10861234567"


class _StuckCall:
    async def write(self, frame: object) -> None:  # never written in this test
        raise AssertionError("nothing is written to the hub here")

    def cancel(self) -> None:
        pass


class _Receiver:
    """What ``_Session._deliveries`` uses of the receiving node: records what it stores
    and the evidence it signs."""

    def __init__(self, trust: TrustStore) -> None:
        self.stored: list[str] = []
        self.signed: list[pb.EvidenceContent] = []
        self.agency = SimpleNamespace(
            config=SimpleNamespace(agency=ME, documents=None),
            identity=SimpleNamespace(uri=f"urn:chapar:agency:{ME}"),
            trust=trust,
            store=SimpleNamespace(
                store_incoming=self._store_incoming,
                earlier_answers=self._nothing,
                store_issued=self._none,
                inbox_entries=self._nothing,
            ),
            sign_evidence=self._sign,
            notify_inbox=lambda: None,
            signer=SimpleNamespace(seal_evidence=None),
            directory=None,
        )

    async def _store_incoming(
        self, good: list[tuple[str, str, list[str], pb.Envelope]], *_: object
    ) -> list[StoredEvidence]:
        self.stored.extend(shams for shams, _, _, _ in good)
        return []

    @staticmethod
    async def _nothing(*_: object) -> dict[object, object]:
        return {}

    @staticmethod
    async def _none(*_: object) -> None:
        return None

    def _sign(self, content: bytes) -> pb.Evidence:
        self.signed.append(pb.EvidenceContent.FromString(content))
        return pb.Evidence(content=content)


def _letter_signed_by_a_certificate_expired_since(tmp_path: Path) -> tuple[pb.Envelope, TrustStore]:
    layout = init_pki(tmp_path / "pki", hub="national", agencies=[SENDER, ME])
    now = dt.datetime.now(dt.UTC)
    intermediate = load_certs(layout.intermediate_cert)[0]
    key = generate_key("ed25519")
    # The sender's signing certificate: valid when it signed (four minutes ago: the test
    # PKI's CAs are five minutes old), expired a minute ago while the letter waited in the
    # hub's queue for its offline recipient (days, in life).
    cert = issue_certificate(
        issuer_cert=intermediate,
        issuer_key=load_key(layout.intermediate_key),
        subject_key=key,
        identity_uri=f"urn:chapar:agency:{SENDER}",
        kind="signing",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(minutes=1),
    )
    body = b"an honest letter"
    header = pb.EnvelopeHeader(
        shams=pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=7),
        subject="sent four minutes ago",
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.sender.agency = SENDER
    header.recipients.add(agency=ME)
    set_timestamp(header.create_time, now - dt.timedelta(minutes=4))
    envelope = pb.Envelope(header=header.SerializeToString(), body=body)
    Signer(key, cert).seal_envelopes([envelope])
    trust = TrustStore(load_certs(layout.root_cert), [intermediate])
    trust.add_certificates([cert])
    return envelope, trust


def test_the_offline_verifier_accepts_the_letter(tmp_path: Path) -> None:
    envelope, trust = _letter_signed_by_a_certificate_expired_since(tmp_path)
    header = _verify_as_created(trust, envelope, check_body=True)  # Letter/Tracking.verify
    assert header.sender.agency == SENDER


async def test_a_letter_whose_signer_expired_while_queued_is_delivered_not_refused(
    tmp_path: Path,
) -> None:
    envelope, trust = _letter_signed_by_a_certificate_expired_since(tmp_path)
    receiver = _Receiver(trust)
    link = HubLink(receiver.agency, None)  # type: ignore[arg-type]  # not connected: no stub
    session = _Session(link, _StuckCall())  # type: ignore[arg-type]
    await session._deliveries([envelope])
    refusals = [(c.event, c.reason) for c in receiver.signed]
    assert refusals == [], (
        f"the recipient's node refused a letter the hub accepted and the offline verifier"
        f" accepts: {refusals}"
    )
    assert receiver.stored == [f"{SENDER}/O/2026/0000007"]
