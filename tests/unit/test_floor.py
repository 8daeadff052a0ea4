"""The floor (loadtest.floor): its arithmetic, and its statements against the real stores.

Never speed: only that every item is count x each, that the totals add up, and that the
write statements the floor counts a letter are the ones the stores' jobs execute, so the
floor cannot drift from the code it stands for.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams
from client_sdk.signing import Signer, sha256
from loadtest import floor
from node.agency import Access, Agency
from node.core.evidence import evidence_content
from node.storage.db import Database
from node.storage.hub_store import HubStore, IncomingLetter

# The agencies of the conftest fixture ``agency``.
SENDER = "000.00.00.G22"
RECIPIENT = "10861234567"

BATCH = 256
E = pb.EvidenceEvent


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return floor.measure(letters=2 * BATCH, batch=BATCH, transport_seconds=0)


def test_every_item_is_its_count_times_its_cost(report: dict[str, Any]) -> None:
    assert report["items"]
    for item in [*report["items"], *report["excluded"]]:
        assert item["process"] in floor.PROCESSES
        assert item["count_per_letter"] > 0
        assert item["us_each"] >= 0
        assert math.isclose(item["us_per_letter"], item["count_per_letter"] * item["us_each"])


def test_the_totals_add_up(report: dict[str, Any]) -> None:
    items = report["items"]
    for process in floor.PROCESSES:
        mine = [i["us_per_letter"] for i in items if i["process"] == process]
        assert mine, process
        assert math.isclose(report["per_process_us"][process], sum(mine))
    assert math.isclose(report["total_us_per_letter"], sum(report["per_process_us"].values()))
    assert math.isclose(report["total_us_per_letter"], sum(report["per_kind_us"].values()))
    assert report["budget_us_per_letter"] == 400
    assert {"protobuf", "crypto", "sqlite"} <= set(report["per_kind_us"])
    assert report["transport"] == {"measured": False}
    assert report["letters"] == 2 * BATCH
    assert report["batch"] == BATCH
    # a COMMIT is per batch: 1/256 a letter
    commits = [i for i in items if "COMMIT" in i["item"]]
    assert commits
    assert all(i["count_per_letter"] == 1 / BATCH for i in commits)


def test_the_table_prints_every_process(report: dict[str, Any]) -> None:
    text = floor.table(report)
    for process in floor.PROCESSES:
        assert f"\n{process}\n" in text
    assert "budget of 400 us" in text


# -- the floor's statements against the stores' jobs --------------------------------------


async def _trace(db: Database) -> list[str]:
    seen: list[str] = []

    def job(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(seen.append)

    await db.write(job)
    return seen


def _per_letter(statements: list[str], letters: int) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for sql in statements:
        kind = floor.statement_kind(sql)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + 1 / letters
    return out


def _same(real: dict[tuple[str, str], float], counted: dict[tuple[str, str], float]) -> None:
    assert real.keys() == counted.keys()
    for key, value in real.items():
        assert math.isclose(value, counted[key]), key


def _signer(code: str) -> Signer:
    key = generate_key("ed25519")
    cert = issue_certificate(
        issuer_cert=None,
        issuer_key=key,
        subject_key=key,
        identity_uri=Identity.for_agency(code).uri,
        kind="signing",
    )
    return Signer(key, cert)


async def test_hub_statements_are_the_stores(tmp_path: Path) -> None:
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        hub = _signer(SENDER)  # any key: the store does not check who signs
        now = dt.datetime.now(dt.UTC)
        letters = []
        for i in range(BATCH):
            shams = pb.Shams(
                origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=i + 1
            )
            header = pb.EnvelopeHeader(shams=shams, subject=f"load 0-{i}").SerializeToString()
            letters.append(
                IncomingLetter(
                    shams=format_shams(shams),
                    sender=SENDER,
                    recipients=[RECIPIENT],
                    envelope=pb.Envelope(header=header, body=b"x" * 1500).SerializeToString(),
                    envelope_sha256=sha256(header),
                    shams_pb=shams,
                )
            )

        def relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:
            return pb.Evidence(
                content=evidence_content(
                    E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
                    issuer="urn:chapar:hub:national",
                    shams=letter.shams_pb,
                    envelope_sha256=letter.envelope_sha256,
                    recipient=recipient,
                    now=now,
                )
            )

        seen = await _trace(store.db)
        await store.accept(letters, relay, hub.seal_evidence)
        _same(_per_letter(seen, BATCH), floor.write_counts(floor.hub_jobs(), ["accept"]))

        receipts = []
        for event in (E.EVIDENCE_EVENT_DELIVERY, E.EVIDENCE_EVENT_HANDOVER):
            contents = [
                evidence_content(
                    event,
                    issuer=f"urn:chapar:agency:{RECIPIENT}",
                    shams=lt.shams_pb,
                    envelope_sha256=lt.envelope_sha256,
                    recipient=RECIPIENT,
                    now=now,
                )
                for lt in letters
            ]
            for evidence, content, lt in zip(
                hub.sign_evidence(contents), contents, letters, strict=True
            ):
                receipts.append((evidence, pb.EvidenceContent.FromString(content), lt.shams))
        seen.clear()
        _, dequeued, strangers = await store.record_receipts(RECIPIENT, receipts)
        assert (dequeued, strangers) == (BATCH, [])
        _same(_per_letter(seen, BATCH), floor.write_counts(floor.hub_jobs(), ["record_receipts"]))

        seen.clear()
        store.ack_notices_later(SENDER, [c.evidence_id for _, c, _ in receipts])
        await store.db.write(lambda conn: None)  # the deferred job rides on this one
        _same(_per_letter(seen, BATCH), floor.write_counts(floor.hub_jobs(), ["ack_notices_later"]))
        assert await store.notices(SENDER, 0, 10) == []
    finally:
        await store.close()


async def test_sender_node_statements_are_the_stores(agency: Agency) -> None:
    store = agency.store
    requests = [
        pb.SubmitEnvelopeRequest(
            request_id=f"r{i}",
            draft=pb.LetterDraft(
                recipients=[pb.Address(agency=RECIPIENT)], subject=f"load 0-{i}", body=b"x" * 1500
            ),
        )
        for i in range(BATCH)
    ]
    access = Access(Identity.for_agency(SENDER), None)
    seen = await _trace(store.db)
    receipts = await agency._submit(requests, access)
    assert all(isinstance(r, pb.Receipt) for r in receipts)
    jobs = floor.sender_jobs(BATCH)
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["submit"]))

    now = dt.datetime.now(dt.UTC)
    hub = _signer(SENDER)

    def evidence(event: int) -> list[tuple[pb.Evidence, pb.EvidenceContent, str]]:
        contents = [
            evidence_content(
                event,  # type: ignore[arg-type]
                issuer="urn:chapar:hub:national",
                shams=r.shams,
                envelope_sha256=r.envelope_sha256,
                recipient=RECIPIENT,
                now=now,
            )
            for r in receipts
            if isinstance(r, pb.Receipt)
        ]
        return [
            (e, pb.EvidenceContent.FromString(c), r.shams_text)
            for e, c, r in zip(hub.sign_evidence(contents), contents, receipts, strict=True)
            if isinstance(r, pb.Receipt)
        ]

    seen.clear()
    await store.record_sender_evidence(evidence(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE))
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["record_sender_evidence (relay)"]))
    seen.clear()
    await store.record_sender_evidence(
        [*evidence(E.EVIDENCE_EVENT_DELIVERY), *evidence(E.EVIDENCE_EVENT_HANDOVER)]
    )
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["record_sender_evidence (notices)"]))


async def test_recipient_node_statements_are_the_stores(agency: Agency) -> None:
    store = agency.store
    signer = agency.signer
    now = dt.datetime.now(dt.UTC)
    letters = []
    for i in range(BATCH):
        shams = pb.Shams(
            origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=i + 1
        )
        header = pb.EnvelopeHeader(shams=shams, sender=pb.Address(agency=RECIPIENT))
        envelope = pb.Envelope(header=header.SerializeToString(), body=b"x" * 1500)
        letters.append((format_shams(shams), RECIPIENT, [""], envelope))

    def delivery(i: int) -> pb.Evidence:
        return pb.Evidence(
            content=evidence_content(
                E.EVIDENCE_EVENT_DELIVERY,
                issuer=agency.identity.uri,
                shams=pb.EnvelopeHeader.FromString(letters[i][3].header).shams,
                envelope_sha256=sha256(letters[i][3].header),
                recipient=SENDER,
                now=now,
            )
        )

    seen = await _trace(store.db)
    stored = await store.store_incoming(
        letters, delivery, signer.seal_evidence, [[] for _ in letters], {}, None, ""
    )
    assert len(stored) == BATCH
    jobs = floor.recipient_jobs()
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["store_incoming"]))

    seen.clear()
    handovers = await agency._acknowledge_many(
        [pb.EnvelopeHeader.FromString(lt[3].header).shams for lt in letters],
        Access(Identity.for_agency(SENDER), None),
    )
    assert all(isinstance(h, pb.Evidence) for h in handovers)
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["record_handovers"]))

    seen.clear()
    ids = [s.evidence_id for s in stored] + [
        pb.EvidenceContent.FromString(h.content).evidence_id
        for h in handovers
        if isinstance(h, pb.Evidence)
    ]
    store.receipts_acknowledged_later(ids)
    await store.db.write(lambda conn: None)  # the deferred job rides on this one
    _same(_per_letter(seen, BATCH), floor.write_counts(jobs, ["receipts_acknowledged_later"]))
