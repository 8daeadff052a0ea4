"""The floor: what the work the exchange cannot skip costs a letter on this machine.

Issue 5 asks for 5,000 letters/s on 2 cores with the hub, two nodes and the load
generator on the box: 0.4 ms of CPU a letter for the four processes together. This tool
measures, in one process with ``time.process_time()`` (CPU, not wall), each operation a
letter needs, with the project's own primitives in tight loops and no glue (no event
loop, no thread hand-off, no per-job savepoint), at frames of ``--batch`` letters (256, the
exchange's full frame flat out), and adds them up per process. What it counts is read
from the code (below); when in doubt it counts the least the design needs, so the sum is
a floor, not an estimate of today's cost.

    python -m loadtest.floor [--letters N] [--batch 256] [--json PATH]

How it measures:

* protobuf: the real messages at their real sizes (a harness letter: 1,500-byte body,
  subject "load i-n", one recipient), built with the real builders
  (``Draft.to_request``, ``validate_draft``, ``build_header``, ``evidence_content``);
  frames are parsed whole (256 letters), with their repeated field listed, and each
  parse or serialisation is divided by the letters it carries.
* cryptography: SHA-256 of the real bodies and headers; ``Signer.seal_envelopes`` and
  ``seal_evidence`` over 256 (Merkle leaves, tree, proofs: per letter; one Ed25519
  signature of the tree head: per batch, measured alone and amortised over 256); an
  inclusion proof checked as the cheaper of ``merkle_paths_hold`` over a whole batch and
  ``merkle_root_from_path`` alone; one ``Verifier.verify`` of a tree head per batch.
* SQLite: the stores' schemas (``hub_store.MIGRATIONS``, ``node_store.MIGRATIONS``) and
  pragmas (``db._pragmas("full")``: WAL, synchronous=FULL) on files in a temporary
  directory, the statements copied from the write jobs and push paths, their parameters
  built before the clock starts, ``executemany`` (or one IN list) a statement a batch,
  one COMMIT a job and batch (fsync is real; its wait is not CPU). Reads go through a
  second connection, as the stores' reader does. ``tests/unit/test_floor.py`` checks
  that the write statements a letter are the ones the real store jobs execute.
* gRPC: the harness's raw mTLS stream (``loadtest.baseline``: two processes, one message a
  write) with messages the size of a small and of a large 256-letter frame, each end's
  CPU a message fitted as ``fixed + per_byte * bytes`` and applied to each frame of the
  path at its real size, divided by 256: one message a frame at its writer and its reader
  (bidirectional streams assumed to cost the same both ways).

What one letter costs where, flat out (``x2``: DELIVERY and HANDOVER, which the design
lets travel together: one receipts frame, one store job, one notices frame):

=================  =======================================================================
process            counted per letter (file:function)
=================  =======================================================================
load generator     serialise its draft in a StreamSubmitEnvelopesRequest
                   (client_sdk/client.py:Draft.to_request, _submit_stream); parse the
                   StreamSubmitEnvelopesResponse (_results); parse the StreamInboxResponse
                   (inbox), its header (_LetterFields._parse) and its DELIVERY's content;
                   SHA-256 of body and header, one envelope and one evidence inclusion
                   proof, 2/256 tree-head verifications (_verify_letter, as
                   harness._consumer asks); serialise the ack request, parse the ack
                   response (_AckStream.ack_many); gRPC: writes 2 frames, reads 3
hub                parse the envelopes frame and the header; envelope proof and 1/256
                   verification (node/hub.py:_relay, TrustStore.verify_envelopes); SHA-256
                   of the header (_check_letter); build, seal and serialise RELAY_ACCEPTANCE
                   (make_relay, HubStore.accept); SQL of HubStore.accept; read the queue
                   page (HubStore.queued: sizes, rows); parse the receipts frame x2 and the
                   contents x2, proofs x2, 2/256 verifications (_receipts); SQL of
                   HubStore.record_receipts (both receipts in one job); serialise the
                   receipt acks; read notices x2 (HubStore.notices); parse the evidence
                   acks and mark the notices x2 acknowledged (ack_notices_later, riding on another
                   commit); gRPC: reads 3 frames, writes 4
sender node        parse the submission frame; build_header (with the body's SHA-256);
                   SHA-256 of the header; build the SUBMISSION_ACCEPTANCE content; seal
                   envelopes and evidence (node/agency.py:_build_nth, _seal_letters);
                   serialise the envelope without its body and the evidence for the outbox
                   (NodeStore.submit, _without_body); SQL of NodeStore.submit; read the
                   outbox (outbox_to_relay: sizes, rows); parse relay results and notices x2 with their
                   contents, proofs x3 and 3/256 verifications (hub_link._Session._verify);
                   SQL of record_sender_evidence (relay results; DELIVERY+HANDOVER);
                   serialise the evidence acks; gRPC: reads 3 frames, writes 3
recipient node     parse the deliveries frame and header, envelope proof, 1/256
                   verification, SHA-256 of body (check_body) and header
                   (hub_link._Session._deliveries); build, seal, serialise DELIVERY; SQL of
                   NodeStore.store_incoming; read the inbox page (unacked_inbox: sizes,
                   rows) and serialise the InboxLetter fields (agency._send_inbox); parse
                   the ack request, read the inbox entry (inbox_entries), build, seal,
                   serialise HANDOVER, SQL of record_handovers (agency._acknowledge_many);
                   read the HANDOVER to send (receipts_after); parse the receipt acks and
                   mark them sent x2 (receipts_acknowledged_later, riding); gRPC: reads 4
                   frames, writes 4
=================  =======================================================================

Not counted (measured and listed under ``excluded`` in the report, with the reason),
because the design does not need it or the same work was done before on the same
bytes: frames answered with messages re-serialised where stored bytes can be spliced
(the hub's relay results, the node's submission and acknowledgement answers); received
envelopes and evidence serialised again to be stored (hub: ``IncomingLetter.envelope``,
``record_receipts``; nodes: ``record_sender_evidence``, ``_without_body`` in
``store_incoming``); contents parsed again for their id (``HubStore.accept``,
``store_incoming``, ``record_handovers``); the recipient's stored envelope and header
parsed and hashed again at acknowledgement; the load generator's header parsed three
times; the hub's body SHA-256 (``verify_envelopes(check_body=True)``: the recipient checks
the body, and the hub's evidence names the header's digest); the request digest
(``agency._request_digest``) and the second, pre-scoping request id in the outbox look-up;
``validate_draft``; the recipient's ``receipts_after`` reading the DELIVERY rows again;
``TrustStore``'s per-member bookkeeping around the primitives; uuid7 request ids; logging,
metrics, the event loop, thread hand-offs and savepoints.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certs.pki import PkiLayout, init_pki
from client_sdk import pb
from client_sdk.client import Draft
from client_sdk.ids import uuid7
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import (
    ENVELOPE_BATCH_PAYLOAD_TYPE,
    EVIDENCE_BATCH_PAYLOAD_TYPE,
    Signer,
    Verifier,
    batch_tree_head,
    merkle_leaf,
    merkle_paths_hold,
    merkle_root_from_path,
    sha256,
)
from client_sdk.trust import TrustStore, load_pem_certificates, set_timestamp
from node.core import lifecycle
from node.core.directory import DirectoryView
from node.core.evidence import evidence_content, evidence_message
from node.core.letters import LetterLimits, build_header, validate_draft
from node.storage import hub_store, node_store
from node.storage.db import _pragmas
from node.storage.node_store import _without_body, request_key

__all__ = [
    "HUB",
    "LOAD",
    "PROCESSES",
    "RECIPIENT",
    "SENDER",
    "Job",
    "Statement",
    "hub_jobs",
    "measure",
    "recipient_jobs",
    "sender_jobs",
    "statement_kind",
]

HUB, SENDER, RECIPIENT, LOAD = "hub", "sender node", "recipient node", "load generator"
PROCESSES = (HUB, SENDER, RECIPIENT, LOAD)
BUDGET_US = 400.0  # 2 cores / 5,000 letters a second
A, B, HUB_NAME = "SENDER.A", "RECIPIENT.B", "national"
BODY_BYTES = 1500  # the harness's default letter (loadtest.harness.Params.body_bytes)
E = pb.EvidenceEvent


# -- what is counted ----------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """An operation one process does ``count`` times a letter."""

    process: str
    op: str  # key of the measured operation
    count: float
    where: str
    reason: str = ""  # for an excluded one: why it is not counted


@dataclass(frozen=True)
class Statement:
    """One SQL statement of a store job: ``rows`` executions (or IN keys, or rows read) a
    letter. ``mode``: "many" (executemany), "in" (one IN list a batch, ``{marks}``),
    "point" (one execute a letter), "read" (a page read on the reader connection)."""

    name: str
    sql: str
    rows: float
    mode: str = "many"


@dataclass(frozen=True)
class Job:
    """A store job as the floor runs it: its statements, then one COMMIT (not counted when
    the job rides on another transaction, as ``Database.write_later`` jobs do)."""

    process: str
    name: str
    where: str
    statements: tuple[Statement, ...]
    commit: bool = True
    reader: bool = False  # reads on the reader connection: no transaction


_IN_LETTERS = "SELECT shams, relay_evidence, envelope_sha256 FROM letters WHERE shams IN ({marks})"
# recipient_state.receipts of a letter with its DELIVERY and HANDOVER kept.
_RECEIPT_BITS = 1 << E.EVIDENCE_EVENT_DELIVERY | 1 << E.EVIDENCE_EVENT_HANDOVER
_QUEUED_WHERE = (
    "FROM queue q JOIN envelopes e ON e.shams = q.shams "
    "WHERE q.recipient = ? AND q.id > ? AND (q.expire_at IS NULL OR q.expire_at > ?) "
)


def hub_jobs() -> list[Job]:
    """node/storage/hub_store.py: accept, queued, record_receipts, notices, ack_notices_later."""
    return [
        Job(
            HUB,
            "accept",
            "hub_store.py:HubStore.accept",
            (
                Statement("look up letters", _IN_LETTERS, 1, "in"),
                Statement(
                    "insert letters",
                    "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence,"
                    " accepted_at, kind, in_reply_to, status) VALUES (?, ?, ?, x'', ?, ?, ?, ?)",
                    1,
                ),
                Statement(
                    "insert envelopes", "INSERT INTO envelopes (shams, envelope) VALUES (?, ?)", 1
                ),
                Statement(
                    "insert queue",
                    "INSERT INTO queue (recipient, shams, enqueued_at, expire_at) VALUES (?, ?, ?, ?)",
                    1,
                ),
                Statement(
                    "insert evidence",
                    "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    1,
                ),
                Statement(
                    "insert recipient_state",
                    "INSERT INTO recipient_state (shams, recipient, state, receipts)"
                    " VALUES (?, ?, ?, 0)",
                    1,
                ),
                # The sender's highest number a frame (told in its welcome): one row for a
                # frame of 256 letters, the full frame this floor assumes.
                Statement(
                    "upsert sender_sequences",
                    "INSERT INTO sender_sequences (origin, domain, year, last) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (origin, domain, year) DO UPDATE SET last = max(last, excluded.last)",
                    1 / 256,
                ),
            ),
        ),
        Job(
            HUB,
            "queue page",
            "hub_store.py:HubStore.queued",
            (
                Statement(
                    "read queue sizes",
                    f"SELECT q.id, length(e.envelope) {_QUEUED_WHERE} ORDER BY q.id LIMIT ?",
                    1,
                    "read",
                ),
                Statement(
                    "read queue rows",
                    f"SELECT q.id, q.shams, e.envelope, q.expire_at {_QUEUED_WHERE} AND q.id <= ?"
                    " ORDER BY q.id LIMIT ?",
                    1,
                    "read",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            HUB,
            "record_receipts",
            "hub_store.py:HubStore.record_receipts",
            (
                Statement(
                    "look up letters of receipts",
                    "SELECT s.shams, l.sender, l.envelope_sha256, s.state, s.receipts"
                    " FROM recipient_state s JOIN letters l ON l.shams = s.shams"
                    " WHERE s.recipient = ? AND s.shams IN ({marks})",
                    1,
                    "in",
                ),
                Statement(
                    "look up evidence ids",
                    "SELECT evidence_id, shams, evidence FROM evidence WHERE evidence_id IN ({marks})",
                    2,
                    "in",
                ),
                Statement(
                    "insert evidence",
                    "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    2,
                ),
                Statement("delete queue", "DELETE FROM queue WHERE recipient = ? AND shams = ?", 1),
                Statement(
                    "insert notices",
                    "INSERT OR IGNORE INTO notices (agency, evidence_id, evidence) VALUES (?, ?, ?)",
                    2,
                ),
                Statement(
                    "update recipient_state",
                    "UPDATE recipient_state SET state = ?, receipts = ?"
                    " WHERE shams = ? AND recipient = ?",
                    1,
                ),
            ),
        ),
        Job(
            HUB,
            "notices page",
            "hub_store.py:HubStore.notices",
            (
                Statement(
                    "read notices",
                    "SELECT id, evidence FROM notices WHERE agency = ? AND id > ? AND acked_at IS NULL"
                    " ORDER BY id LIMIT ?",
                    2,
                    "read",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            HUB,
            "ack_notices_later",
            "hub_store.py:HubStore.ack_notices_later",
            (
                Statement(
                    "mark notices acknowledged",
                    "UPDATE notices SET acked_at = ? WHERE agency = ? AND evidence_id = ?"
                    " AND acked_at IS NULL",
                    2,
                ),
            ),
            commit=False,
        ),
    ]


_EVIDENCE_IDS_IN = "SELECT evidence_id FROM evidence WHERE evidence_id IN ({marks})"
# The letters the evidence names, with their recipients' states (record_sender_evidence:
# the check that the evidence is about the letter sent, and advance_states).
_SENT_IN = (
    "SELECT o.shams, o.envelope_sha256, o.relayed_at, s.recipient, s.state"
    " FROM outbox o JOIN recipient_state s ON s.shams = o.shams"
    " WHERE o.shams IN ({marks})"
)
_UPDATE_STATE = "UPDATE recipient_state SET state = ? WHERE shams = ? AND recipient = ?"
_NODE_EVIDENCE = (
    "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at) VALUES (?, ?, ?, ?, ?)"
)
_NODE_RECEIPT = (
    "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
    " VALUES (?, ?, ?, ?, 1, ?)"
)


def sender_jobs(batch: int) -> list[Job]:
    """node/storage/node_store.py at the sending node: submit, outbox_to_relay,
    record_sender_evidence (relay results; DELIVERY and HANDOVER notices)."""
    return [
        Job(
            SENDER,
            "submit",
            "node_store.py:NodeStore.submit",
            (
                Statement(
                    "look up request ids",
                    "SELECT request_id, receipt, request_digest FROM outbox"
                    " WHERE request_id IN ({marks})",
                    1,
                    "in",
                ),
                Statement(
                    "insert counter",
                    "INSERT OR IGNORE INTO shams_counter (origin, domain, year, last)"
                    " VALUES (?, ?, ?, 0)",
                    1 / batch,
                ),
                Statement(
                    "update counter",
                    "UPDATE shams_counter SET last = last + ? WHERE origin = ? AND domain = ?"
                    " AND year = ? RETURNING last",
                    1 / batch,
                    "point",
                ),
                Statement(
                    "insert outbox",
                    "INSERT INTO outbox (shams, request_id, request_digest, envelope,"
                    " envelope_sha256, receipt, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    1,
                ),
                Statement(
                    "insert bodies", "INSERT INTO bodies (box, shams, body) VALUES ('O', ?, ?)", 1
                ),
                Statement("insert evidence", _NODE_EVIDENCE, 1),
                Statement(
                    "insert recipient_state",
                    "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, ?)",
                    1,
                ),
            ),
        ),
        Job(
            SENDER,
            "outbox page",
            "node_store.py:NodeStore.outbox_to_relay",
            (
                Statement(
                    "read outbox sizes",
                    "SELECT o.rowid, length(o.envelope) + coalesce(length(b.body), 0) "
                    f"{_WAITING} ORDER BY o.rowid LIMIT ?",
                    1,
                    "read",
                ),
                Statement(
                    "read outbox rows",
                    "SELECT o.rowid, o.shams, o.envelope, b.body, o.envelope_sha256 "
                    f"{_WAITING} AND o.rowid <= ? ORDER BY o.rowid LIMIT ?",
                    1,
                    "read",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            SENDER,
            "record_sender_evidence (relay)",
            "node_store.py:NodeStore.record_sender_evidence",
            (
                Statement("look up evidence ids", _EVIDENCE_IDS_IN, 1, "in"),
                Statement("insert evidence", _NODE_EVIDENCE, 1),
                Statement(
                    "update outbox",
                    "UPDATE outbox SET relay_state = 1 WHERE shams = ? AND relay_state = 0",
                    1,
                ),
                Statement("read letters and states", _SENT_IN, 1, "in"),
                Statement("update recipient_state", _UPDATE_STATE, 1),
            ),
        ),
        Job(
            SENDER,
            "record_sender_evidence (notices)",
            "node_store.py:NodeStore.record_sender_evidence",
            (
                Statement("look up evidence ids", _EVIDENCE_IDS_IN, 2, "in"),
                Statement("insert evidence", _NODE_EVIDENCE, 2),
                Statement("read letters and states", _SENT_IN, 1, "in"),
                Statement("update recipient_state", _UPDATE_STATE, 1),
            ),
        ),
    ]


_WAITING = (
    "FROM outbox o LEFT JOIN bodies b ON b.box = 'O' AND b.shams = o.shams "
    "WHERE o.relay_state = 0 AND o.rowid > ? "
)
_UNACKED = (
    "FROM inbox i LEFT JOIN bodies b ON b.box = 'I' AND b.shams = i.shams "
    "WHERE i.pending = 1 AND i.rowid > ? "
)


def recipient_jobs() -> list[Job]:
    """node/storage/node_store.py at the receiving node: store_incoming, unacked_inbox,
    inbox_entries, record_handovers, receipts_after, receipts_acknowledged_later."""
    return [
        Job(
            RECIPIENT,
            "store_incoming",
            "node_store.py:NodeStore.store_incoming",
            (
                Statement(
                    "look up inbox",
                    "SELECT delivery, envelope FROM inbox WHERE shams = ?",
                    1,
                    "point",
                ),
                Statement(
                    "insert inbox",
                    "INSERT INTO inbox (shams, sender, mailboxes, envelope, delivery, received_at,"
                    " pending) VALUES (?, ?, ?, ?, ?, ?, 1)",
                    1,
                ),
                Statement(
                    "insert bodies", "INSERT INTO bodies (box, shams, body) VALUES ('I', ?, ?)", 1
                ),
                Statement("insert evidence", _NODE_RECEIPT, 1),
            ),
        ),
        Job(
            RECIPIENT,
            "inbox page",
            "node_store.py:NodeStore.unacked_inbox",
            (
                Statement(
                    "read inbox sizes",
                    "SELECT i.rowid, length(i.envelope) + coalesce(length(b.body), 0) "
                    f"{_UNACKED} ORDER BY i.rowid LIMIT ?",
                    1,
                    "read",
                ),
                Statement(
                    "read inbox rows",
                    "SELECT i.rowid, i.shams, i.mailboxes, i.envelope, i.delivery, i.received_at,"
                    f" b.body, i.acked {_UNACKED} AND i.rowid <= ? ORDER BY i.rowid LIMIT ?",
                    1,
                    "read",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            RECIPIENT,
            "inbox_entries",
            "node_store.py:NodeStore.inbox_entries",
            (
                Statement(
                    "read inbox entries",
                    "SELECT shams, mailboxes, envelope, handover, acked, pending FROM inbox"
                    " WHERE shams IN ({marks})",
                    1,
                    "in",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            RECIPIENT,
            "record_handovers",
            "node_store.py:NodeStore.record_handovers",
            (
                Statement(
                    "update inbox",
                    "UPDATE inbox SET handover = ?, pending = NULL"
                    " WHERE shams = ? AND handover IS NULL",
                    1,
                ),
                Statement("insert evidence", _NODE_RECEIPT, 1),
            ),
        ),
        Job(
            RECIPIENT,
            "receipts_after",
            "node_store.py:NodeStore.receipts_after",
            (
                Statement(
                    "read receipts to send",
                    "SELECT rowid, evidence_id, evidence FROM evidence WHERE to_send = 1"
                    " AND rowid > ? ORDER BY rowid LIMIT ?",
                    1,
                    "read",
                ),
            ),
            commit=False,
            reader=True,
        ),
        Job(
            RECIPIENT,
            "receipts_acknowledged_later",
            "node_store.py:NodeStore.receipts_acknowledged_later",
            (
                Statement(
                    "mark receipts sent",
                    "UPDATE evidence SET to_send = 0, acked_at = ? WHERE evidence_id = ?",
                    2,
                ),
            ),
            commit=False,
        ),
    ]


_VERB_TABLE = re.compile(
    r"^\s*(INSERT(?: OR IGNORE)? INTO|UPDATE|DELETE FROM)\s+(\w+)", re.IGNORECASE
)


def statement_kind(sql: str) -> tuple[str, str] | None:
    """("INSERT INTO", "letters") for a write statement, None for anything else."""
    m = _VERB_TABLE.match(sql)
    if m is None:
        return None
    return " ".join(m.group(1).upper().split()), m.group(2).lower()


def write_counts(jobs: Sequence[Job], names: Sequence[str]) -> dict[tuple[str, str], float]:
    """Write statements a letter of the named jobs, by (verb, table)."""
    out: dict[tuple[str, str], float] = {}
    for job in jobs:
        if job.name in names:
            for st in job.statements:
                kind = statement_kind(st.sql)
                if kind is not None:
                    out[kind] = out.get(kind, 0.0) + st.rows
    return out


# Every other operation: (process, op, count a letter, where).
_COUNTED: tuple[tuple[str, str, float, str], ...] = (
    # load generator
    (LOAD, "serialise submit frame", 1, "client_sdk/client.py:Draft.to_request, _submit_stream"),
    (LOAD, "parse submit answer frame", 1, "client_sdk/client.py:_submit_stream, _results"),
    (LOAD, "parse inbox frame", 1, "client_sdk/client.py:ExchangeClient.inbox"),
    (LOAD, "parse header", 1, "client_sdk/client.py:_LetterFields._parse"),
    (LOAD, "parse evidence content", 1, "client_sdk/trust.py:_verify_evidence"),
    (LOAD, "SHA-256 body", 1, "client_sdk/trust.py:_verify_envelope (check_body)"),
    (LOAD, "SHA-256 header", 1, "client_sdk/client.py:_verify_letter"),
    (LOAD, "inclusion proof", 2, "client_sdk/trust.py:_verify_batch_member (envelope, DELIVERY)"),
    (LOAD, "verify tree head", 2, "client_sdk/signing.py:Verifier.verify (per batch)"),
    (LOAD, "serialise ack frame", 1, "client_sdk/client.py:_AckStream.ack_many"),
    (LOAD, "parse ack answer frame", 1, "client_sdk/client.py:_AckCall._read"),
    # hub
    (HUB, "parse envelopes frame", 1, "node/hub.py:Hub._read (Connect)"),
    (HUB, "parse header", 1, "client_sdk/trust.py:_verify_envelope"),
    (HUB, "inclusion proof", 1, "node/hub.py:_relay (TrustStore.verify_envelopes)"),
    (HUB, "verify tree head", 1, "client_sdk/signing.py:Verifier.verify (per batch)"),
    (HUB, "SHA-256 header", 1, "node/hub.py:_check_letter (envelope_sha256)"),
    (HUB, "build evidence content", 1, "node/hub.py:_relay.make_relay (evidence_content)"),
    (HUB, "seal evidence (tree, proofs)", 1, "client_sdk/signing.py:Signer.seal_evidence"),
    (HUB, "sign tree head", 1, "client_sdk/signing.py:Signer.sign (per batch)"),
    (HUB, "serialise evidence", 1, "node/storage/hub_store.py:HubStore.accept"),
    (HUB, "parse evidence frame", 2, "node/hub.py:Hub._read (receipts)"),
    (HUB, "parse evidence content", 2, "node/hub.py:_receipts (verify_evidence_many)"),
    (HUB, "inclusion proof", 2, "node/hub.py:_receipts (verify_evidence_many)"),
    (HUB, "verify tree head", 2, "client_sdk/signing.py:Verifier.verify (per batch)"),
    (HUB, "serialise id acks", 1, "node/hub.py:Hub._read (receipt_acks)"),
    (HUB, "parse id acks", 1, "node/hub.py:Hub._read (evidence_acks)"),
    # sender node
    (SENDER, "parse submit frame", 1, "node/agency.py:StreamSubmitEnvelopes (rpc/wire.py:parse)"),
    (SENDER, "build_header", 1, "node/agency.py:_build_nth (core/letters.py:build_header)"),
    (SENDER, "SHA-256 header", 1, "node/agency.py:_build_nth"),
    (SENDER, "build evidence content", 1, "node/agency.py:_build_nth (evidence_message)"),
    (SENDER, "seal envelopes (tree, proofs)", 1, "node/agency.py:_seal_letters"),
    (SENDER, "sign tree head", 1, "client_sdk/signing.py:Signer.sign (per batch)"),
    (SENDER, "seal evidence (tree, proofs)", 1, "node/agency.py:_seal_letters"),
    (SENDER, "sign tree head", 1, "client_sdk/signing.py:Signer.sign (per batch)"),
    (SENDER, "serialise envelope without body", 1, "node/storage/node_store.py:_without_body"),
    (SENDER, "serialise evidence", 1, "node/storage/node_store.py:NodeStore.submit"),
    (SENDER, "parse evidence frame", 3, "node/rpc/hub_link.py:_Session._read"),
    (SENDER, "parse evidence content", 3, "node/rpc/hub_link.py:_Session._verify"),
    (SENDER, "inclusion proof", 3, "node/rpc/hub_link.py:_Session._verify"),
    (SENDER, "verify tree head", 3, "client_sdk/signing.py:Verifier.verify (per batch)"),
    (SENDER, "serialise id acks", 1, "node/rpc/hub_link.py:_Session._evidence"),
    # recipient node
    (RECIPIENT, "parse envelopes frame", 1, "node/rpc/hub_link.py:_Session._read (deliveries)"),
    (RECIPIENT, "parse header", 1, "client_sdk/trust.py:_verify_envelope"),
    (RECIPIENT, "inclusion proof", 1, "node/rpc/hub_link.py:_deliveries (verify_envelopes)"),
    (RECIPIENT, "verify tree head", 1, "client_sdk/signing.py:Verifier.verify (per batch)"),
    (RECIPIENT, "SHA-256 body", 1, "client_sdk/trust.py:_verify_envelope (check_body)"),
    (RECIPIENT, "SHA-256 header", 1, "node/rpc/hub_link.py:_deliveries"),
    (
        RECIPIENT,
        "build evidence content",
        2,
        "hub_link.py:_deliveries.answer; agency.py:_acknowledge_many",
    ),
    (
        RECIPIENT,
        "seal evidence (tree, proofs)",
        2,
        "NodeStore.store_incoming seal; Signer.sign_evidence",
    ),
    (RECIPIENT, "sign tree head", 2, "client_sdk/signing.py:Signer.sign (per batch)"),
    (RECIPIENT, "serialise evidence", 2, "node_store.py:store_incoming, record_handovers"),
    (RECIPIENT, "serialise inbox letter fields", 1, "node/agency.py:_send_inbox"),
    (RECIPIENT, "parse ack frame", 1, "node/agency.py:StreamAckEnvelopes"),
    (RECIPIENT, "parse id acks", 1, "node/rpc/hub_link.py:_Session._handle (receipt_acks)"),
)

_EXCLUDED: tuple[tuple[str, str, float, str, str], ...] = (
    (
        HUB,
        "SHA-256 body",
        1,
        "node/hub.py:_relay",
        "verify_envelopes(check_body=True): the recipient checks the body",
    ),
    (
        HUB,
        "serialise envelope",
        1,
        "node/hub.py:_check_letter",
        "received bytes serialised again to store them",
    ),
    (
        HUB,
        "parse evidence content",
        1,
        "hub_store.py:HubStore.accept",
        "content parsed again for its id",
    ),
    (
        HUB,
        "serialise evidence",
        2,
        "hub_store.py:HubStore.record_receipts",
        "received bytes serialised again",
    ),
    (
        HUB,
        "serialise relay results",
        1,
        "node/hub.py:Hub._read",
        "stored evidence could be spliced",
    ),
    (
        SENDER,
        "request digest",
        1,
        "node/agency.py:_request_digest",
        "tells a reused request id; not needed to carry a letter",
    ),
    (
        SENDER,
        "validate_draft",
        1,
        "node/core/letters.py:validate_draft",
        "validation, not one of the four kinds of work",
    ),
    (
        SENDER,
        "serialise evidence",
        3,
        "node_store.py:record_sender_evidence",
        "received bytes serialised again",
    ),
    (
        SENDER,
        "serialise submit answer",
        1,
        "node/agency.py:_batch",
        "stored receipts could be spliced",
    ),
    (
        RECIPIENT,
        "serialise envelope without body",
        1,
        "node_store.py:store_incoming (_without_body)",
        "received bytes serialised again",
    ),
    (
        RECIPIENT,
        "parse evidence content",
        2,
        "node_store.py:store_incoming, record_handovers",
        "content parsed again for its id",
    ),
    (
        RECIPIENT,
        "parse stored envelope",
        1,
        "node_store.py:inbox_entries",
        "parsed again at acknowledgement",
    ),
    (
        RECIPIENT,
        "parse header",
        1,
        "node/agency.py:_acknowledge_many",
        "parsed again at acknowledgement",
    ),
    (
        RECIPIENT,
        "SHA-256 header",
        1,
        "node/agency.py:_acknowledge_many",
        "hashed again at acknowledgement",
    ),
    (
        RECIPIENT,
        "serialise ack answer",
        1,
        "node/agency.py:_ack_batch",
        "stored evidence could be spliced",
    ),
    (
        LOAD,
        "parse header",
        2,
        "client_sdk/client.py:_verify_as_created, trust.py:_verify_envelope",
        "parsed three times in all",
    ),
    (
        LOAD,
        "TrustStore bookkeeping",
        2,
        "client_sdk/trust.py:_signer, _check_signed",
        "per-member glue around the primitives",
    ),
)


# -- the letters ----------------------------------------------------------------------------


@dataclass
class _World:
    """Real messages for ``letters`` letters in batches of ``batch``, signed by real keys."""

    batch: int
    drafts: list[pb.LetterDraft]
    draft_objects: list[Draft]
    shams: list[pb.Shams]
    headers: list[bytes]
    envelopes: list[pb.Envelope]
    submissions: list[pb.Evidence]
    relays: list[pb.Evidence]
    deliveries: list[pb.Evidence]
    handovers: list[pb.Evidence]
    signers: dict[str, Signer]
    trust: TrustStore
    directory: DirectoryView
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        return [items[i : i + self.batch] for i in range(0, len(items), self.batch)]


def _signers(pki: PkiLayout) -> dict[str, Signer]:
    return {
        A: Signer.from_files(pki.agency_dir(A) / "signing.key", pki.agency_dir(A) / "signing.crt"),
        B: Signer.from_files(pki.agency_dir(B) / "signing.key", pki.agency_dir(B) / "signing.crt"),
        HUB: Signer.from_files(
            pki.hub_dir(HUB_NAME) / "signing.key", pki.hub_dir(HUB_NAME) / "signing.crt"
        ),
    }


def _world(pki: PkiLayout, letters: int, batch: int) -> _World:
    signers = _signers(pki)
    trust = TrustStore(load_pem_certificates(pki.root_cert))
    trust.add_certificates(load_pem_certificates(pki.intermediate_cert))
    trust.add_certificates([s.certificate for s in signers.values()])
    directory = DirectoryView(
        pb.Directory(
            version=1,
            agencies=[
                pb.Agency(code=c, display_name=c, state=pb.AGENCY_STATE_ACTIVE) for c in (A, B)
            ],
        )
    )
    now = dt.datetime.now(dt.UTC)
    body = "x" * BODY_BYTES
    objects = [Draft(to=[B], subject=f"load 0-{i}", body=body) for i in range(letters)]
    drafts = [
        validate_draft(
            d.to_request().draft, sender=A, directory=directory, limits=LetterLimits(), now=now
        )
        for d in objects
    ]
    shams = [
        pb.Shams(origin=A, domain=pb.SHAMS_DOMAIN_OUTGOING, year=now.year, sequence=i + 1)
        for i in range(letters)
    ]
    headers = [
        build_header(d, sender=A, shams=s, now=now) for d, s in zip(drafts, shams, strict=True)
    ]
    envelopes = [pb.Envelope(header=h, body=d.body) for h, d in zip(headers, drafts, strict=True)]
    world = _World(
        batch,
        drafts,
        objects,
        shams,
        headers,
        envelopes,
        [],
        [],
        [],
        [],
        signers,
        trust,
        directory,
        now,
    )

    def evidence(event: int, issuer: str, recipient: str) -> list[pb.Evidence]:
        out = [
            pb.Evidence(
                content=evidence_content(
                    event,  # type: ignore[arg-type]
                    issuer=issuer,
                    shams=s,
                    envelope_sha256=sha256(h),
                    recipient=recipient,
                    now=now,
                )
            )
            for s, h in zip(shams, headers, strict=True)
        ]
        return out

    world.submissions = evidence(
        E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, f"urn:chapar:agency:{A}", ""
    )
    world.relays = evidence(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, f"urn:chapar:hub:{HUB_NAME}", B)
    world.deliveries = evidence(E.EVIDENCE_EVENT_DELIVERY, f"urn:chapar:agency:{B}", B)
    world.handovers = evidence(E.EVIDENCE_EVENT_HANDOVER, f"urn:chapar:agency:{B}", B)
    for chunk in world.batches(envelopes):
        signers[A].seal_envelopes(chunk)
    for items, who in (
        (world.submissions, A),
        (world.relays, HUB),
        (world.deliveries, B),
        (world.handovers, B),
    ):
        for chunk in world.batches(items):
            signers[who].seal_evidence(chunk)
    return world


# -- timing ----------------------------------------------------------------------------------


def _per_letter(letters: int, run: Callable[[], object]) -> float:
    """Microseconds of CPU ``run`` took, divided by ``letters``: the best of ``_ROUNDS``
    runs, with the cyclic garbage collector off while it runs (as ``timeit`` does: a
    collection of this process's large heap of test letters is not the operation's)."""
    best = float("inf")
    for _ in range(_ROUNDS):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            run()
            best = min(best, time.process_time() - start)
        finally:
            gc.enable()
    return best * 1e6 / letters


def _repeat_us(fn: Callable[[], object], times: int) -> float:
    def run() -> None:
        for _ in range(times):
            fn()

    return _per_letter(times, run)


_ROUNDS = 3


def _each(chunks: Sequence[Sequence[Any]], fn: Callable[[Any], object]) -> Callable[[], None]:
    """A run of ``fn`` over every item, batch by batch, keeping one batch's results at a
    time (as a process handling frames does), not every letter's."""

    def run() -> None:
        for chunk in chunks:
            list(map(fn, chunk))

    return run


@dataclass
class _Frames:
    """Each frame of the path serialised for each batch of letters."""

    submit: list[bytes]
    submit_answer: list[bytes]
    envelopes: list[bytes]  # ConnectRequest (node -> hub) and ConnectResponse (hub -> node)
    relay_results: list[bytes]
    receipts: list[bytes]  # DELIVERY + HANDOVER, node -> hub
    notices: list[bytes]  # DELIVERY + HANDOVER, hub -> node
    id_acks: list[bytes]  # two evidence ids a letter
    inbox: list[bytes]
    ack: list[bytes]
    ack_answer: list[bytes]


def _frames(w: _World) -> _Frames:
    def each(make: Callable[[int, int], Any]) -> list[bytes]:
        return [
            make(i, min(i + w.batch, len(w.envelopes))).SerializeToString()
            for i in range(0, len(w.envelopes), w.batch)
        ]

    def ids(i: int, j: int) -> list[str]:
        return [_evidence_id(e) for e in (*w.deliveries[i:j], *w.handovers[i:j])]

    def inbox_letter(k: int) -> pb.InboxLetter:
        letter = pb.InboxLetter(
            shams=w.shams[k],
            shams_text=format_shams(w.shams[k]),
            envelope=w.envelopes[k],
            delivery=w.deliveries[k],
        )
        set_timestamp(letter.receive_time, w.now)
        return letter

    return _Frames(
        submit=each(
            lambda i, j: pb.StreamSubmitEnvelopesRequest(
                requests=[d.to_request() for d in w.draft_objects[i:j]]
            )
        ),
        submit_answer=each(
            lambda i, j: pb.StreamSubmitEnvelopesResponse(
                results=[
                    pb.SubmitResult(
                        request_id=w.draft_objects[k].request_id or "", receipt=_receipt(w, k)
                    )
                    for k in range(i, j)
                ]
            )
        ),
        envelopes=each(
            lambda i, j: pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=w.envelopes[i:j]))
        ),
        relay_results=each(
            lambda i, j: pb.ConnectResponse(relay_results=pb.EvidenceBatch(evidence=w.relays[i:j]))
        ),
        receipts=each(
            lambda i, j: pb.ConnectRequest(
                receipts=pb.EvidenceBatch(evidence=[*w.deliveries[i:j], *w.handovers[i:j]])
            )
        ),
        notices=each(
            lambda i, j: pb.ConnectResponse(
                evidence=pb.EvidenceBatch(evidence=[*w.deliveries[i:j], *w.handovers[i:j]])
            )
        ),
        id_acks=each(
            lambda i, j: pb.ConnectRequest(
                evidence_acks=pb.EvidenceAckBatch(evidence_ids=ids(i, j))
            )
        ),
        inbox=each(
            lambda i, j: pb.StreamInboxResponse(letters=[inbox_letter(k) for k in range(i, j)])
        ),
        ack=each(lambda i, j: pb.StreamAckEnvelopesRequest(shams=w.shams[i:j])),
        ack_answer=each(
            lambda i, j: pb.StreamAckEnvelopesResponse(
                results=[pb.AckResult(evidence=e) for e in w.handovers[i:j]]
            )
        ),
    )


def _receipt(w: _World, k: int) -> pb.Receipt:
    return pb.Receipt(
        shams=w.shams[k],
        shams_text=format_shams(w.shams[k]),
        envelope_sha256=sha256(w.headers[k]),
        evidence=w.submissions[k],
    )


def _evidence_id(e: pb.Evidence) -> str:
    return pb.EvidenceContent.FromString(e.content).evidence_id


def _measure_ops(w: _World, f: _Frames) -> dict[str, float]:
    """Microseconds of CPU a letter (or a batch, for the ``per batch`` ones) of each op."""
    n = len(w.envelopes)
    ops: dict[str, float] = {}
    bodies = [e.body for e in w.envelopes]
    contents = [e.content for e in w.deliveries]
    hub = w.signers[HUB]

    def parse(cls: Any, frames: list[bytes], repeated: Callable[[Any], Any]) -> float:
        return _per_letter(n, _each([frames], lambda raw: list(repeated(cls.FromString(raw)))))

    # protobuf: frames, parsed whole and listed
    ops["parse submit frame"] = parse(
        pb.StreamSubmitEnvelopesRequest, f.submit, lambda m: m.requests
    )
    ops["parse submit answer frame"] = parse(
        pb.StreamSubmitEnvelopesResponse, f.submit_answer, lambda m: m.results
    )
    ops["parse envelopes frame"] = parse(
        pb.ConnectRequest, f.envelopes, lambda m: m.envelopes.envelopes
    )
    ops["parse evidence frame"] = parse(
        pb.ConnectResponse, f.relay_results, lambda m: m.relay_results.evidence
    )
    ops["parse inbox frame"] = parse(pb.StreamInboxResponse, f.inbox, lambda m: m.letters)
    ops["parse ack frame"] = parse(pb.StreamAckEnvelopesRequest, f.ack, lambda m: m.shams)
    ops["parse ack answer frame"] = parse(
        pb.StreamAckEnvelopesResponse, f.ack_answer, lambda m: m.results
    )
    ops["parse id acks"] = parse(
        pb.ConnectRequest, f.id_acks, lambda m: m.evidence_acks.evidence_ids
    )
    ops["parse header"] = _per_letter(n, _each(w.batches(w.headers), pb.EnvelopeHeader.FromString))
    ops["parse evidence content"] = _per_letter(
        n, _each(w.batches(contents), pb.EvidenceContent.FromString)
    )
    stored = [_without_body(e) for e in w.envelopes]
    ops["parse stored envelope"] = _per_letter(n, _each(w.batches(stored), pb.Envelope.FromString))

    def serialise_frames(make: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> float:
        return _per_letter(n, _each([w.batches(items)], lambda c: make(c).SerializeToString()))

    ops["serialise submit frame"] = serialise_frames(
        lambda c: pb.StreamSubmitEnvelopesRequest(requests=[d.to_request() for d in c]),
        w.draft_objects,
    )
    ops["serialise ack frame"] = serialise_frames(
        lambda c: pb.StreamAckEnvelopesRequest(shams=c), w.shams
    )
    ids = [_evidence_id(e) for e in w.deliveries]
    ops["serialise id acks"] = serialise_frames(
        lambda c: pb.ConnectRequest(
            evidence_acks=pb.EvidenceAckBatch(evidence_ids=[i for i in c for _ in (0, 1)])
        ),
        ids,
    )
    ops["serialise evidence"] = _per_letter(
        n, _each(w.batches(w.deliveries), pb.Evidence.SerializeToString)
    )
    ops["serialise envelope"] = _per_letter(
        n, _each(w.batches(w.envelopes), pb.Envelope.SerializeToString)
    )
    ops["serialise envelope without body"] = _per_letter(
        n, _each(w.batches(w.envelopes), _without_body)
    )
    ops["serialise relay results"] = serialise_frames(
        lambda c: pb.ConnectResponse(relay_results=pb.EvidenceBatch(evidence=c)), w.relays
    )
    receipts = [_receipt(w, k) for k in range(n)]
    ops["serialise submit answer"] = serialise_frames(
        lambda c: pb.StreamSubmitEnvelopesResponse(
            results=[pb.SubmitResult(request_id="r", receipt=r) for r in c]
        ),
        receipts,
    )
    ops["serialise ack answer"] = serialise_frames(
        lambda c: pb.StreamAckEnvelopesResponse(results=[pb.AckResult(evidence=e) for e in c]),
        w.handovers,
    )
    texts = [format_shams(s) for s in w.shams]

    def inbox_fields() -> None:
        for text in texts:
            fields = pb.InboxLetter(shams=parse_shams(text), shams_text=text)
            set_timestamp(fields.receive_time, w.now)
            fields.SerializeToString()

    ops["serialise inbox letter fields"] = _per_letter(n, inbox_fields)
    pairs = w.batches(list(zip(w.drafts, w.shams, strict=True)))
    ops["build_header"] = _per_letter(
        n, _each(pairs, lambda p: build_header(p[0], sender=A, shams=p[1], now=w.now))
    )
    numbered = w.batches(list(zip(w.shams, [sha256(h) for h in w.headers], strict=True)))
    ops["build evidence content"] = _per_letter(
        n,
        _each(
            numbered,
            lambda p: evidence_message(
                pb.EVIDENCE_EVENT_DELIVERY,
                issuer=f"urn:chapar:agency:{B}",
                shams=p[0],
                envelope_sha256=p[1],
                recipient=B,
                now=w.now,
            ).SerializeToString(deterministic=True),
        ),
    )
    limits = LetterLimits()
    ops["validate_draft"] = _per_letter(
        n,
        _each(
            w.batches(w.drafts),
            lambda d: validate_draft(d, sender=A, directory=w.directory, limits=limits, now=w.now),
        ),
    )
    requests = w.batches([d.to_request() for d in w.draft_objects])
    ops["request digest"] = _per_letter(
        n, _each(requests, lambda r: sha256(r.draft.SerializeToString(deterministic=True)))
    )

    # cryptography
    ops["SHA-256 body"] = _per_letter(n, _each(w.batches(bodies), sha256))
    ops["SHA-256 header"] = _per_letter(n, _each(w.batches(w.headers), sha256))
    ops["sign tree head"] = sign_us = _repeat_us(
        lambda: hub.sign(EVIDENCE_BATCH_PAYLOAD_TYPE, batch_tree_head(256, bytes(32))), 200
    )
    batches = -(-n // w.batch)
    ops["seal envelopes (tree, proofs)"] = (
        _per_letter(n, _each([w.batches(w.envelopes)], w.signers[A].seal_envelopes))
        - sign_us * batches / n
    )
    ops["seal evidence (tree, proofs)"] = (
        _per_letter(n, _each([w.batches(w.relays)], hub.seal_evidence)) - sign_us * batches / n
    )
    verifier = Verifier(w.signers[A].certificate)
    env0 = w.envelopes[0]
    head = batch_tree_head(
        env0.batch_proof.tree_size,
        merkle_root_from_path(
            merkle_leaf(env0.header),
            env0.batch_proof.leaf_index,
            env0.batch_proof.tree_size,
            list(env0.batch_proof.path),
        )
        or b"",
    )
    ops["verify tree head"] = _repeat_us(
        lambda: verifier.verify(ENVELOPE_BATCH_PAYLOAD_TYPE, head, env0.signature), 200
    )

    def whole(items: Sequence[pb.Envelope | pb.Evidence], payload: Callable[[Any], bytes]) -> None:
        for chunk in w.batches(items):
            root = merkle_paths_hold(
                [merkle_leaf(payload(e)) for e in chunk], [e.batch_proof.path for e in chunk]
            )
            assert root is not None

    def alone(items: Sequence[pb.Envelope | pb.Evidence], payload: Callable[[Any], bytes]) -> None:
        for e in items:
            proof = e.batch_proof
            root = merkle_root_from_path(
                merkle_leaf(payload(e)), proof.leaf_index, proof.tree_size, list(proof.path)
            )
            assert root is not None

    ops["inclusion proof, whole batch"] = _per_letter(
        n, lambda: whole(w.envelopes, lambda e: e.header)
    )
    ops["inclusion proof, alone"] = _per_letter(n, lambda: alone(w.envelopes, lambda e: e.header))
    ops["inclusion proof"] = min(ops["inclusion proof, whole batch"], ops["inclusion proof, alone"])

    # TrustStore against its primitives (fresh batches each: no cached tree head)
    fresh = [pb.Envelope(header=e.header, body=e.body) for e in w.envelopes]
    for chunk in w.batches(fresh):
        w.signers[A].seal_envelopes(chunk)
    verify_all = _each([w.batches(fresh)], w.trust.verify_envelopes)

    def verify_fresh() -> None:
        w.trust._batch_heads.clear()  # every round verifies its tree heads, none cached
        verify_all()

    trust_us = _per_letter(n, verify_fresh)
    primitives = (
        ops["parse header"]
        + ops["SHA-256 body"]
        + ops["inclusion proof, whole batch"]
        + ops["verify tree head"] / w.batch
    )
    ops["TrustStore.verify_envelopes a member"] = trust_us
    ops["TrustStore bookkeeping"] = max(0.0, trust_us - primitives)
    return ops


# -- SQLite ---------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Parameters of every statement, for every letter, built before any clock starts."""

    batch: int
    shams: list[str]
    request_keys: list[str]
    submission_ids: list[str]
    relay_ids: list[str]
    delivery_ids: list[str]
    handover_ids: list[str]
    envelope: bytes  # a signed envelope
    stored_envelope: bytes  # without its body
    body: bytes
    digest: bytes
    receipt: bytes
    evidence: bytes


def _rows(w: _World) -> _Rows:
    n = len(w.envelopes)
    return _Rows(
        batch=w.batch,
        shams=[format_shams(s) for s in w.shams],
        request_keys=[request_key(f"urn:chapar:client:{A}:load", uuid7()) for _ in range(n)],
        submission_ids=[uuid7() for _ in range(n)],
        relay_ids=[uuid7() for _ in range(n)],
        delivery_ids=[uuid7() for _ in range(n)],
        handover_ids=[uuid7() for _ in range(n)],
        envelope=w.envelopes[0].SerializeToString(),
        stored_envelope=_without_body(w.envelopes[0]),
        body=w.envelopes[0].body,
        digest=sha256(w.headers[0]),
        receipt=_receipt(w, 0).SerializeToString(),
        evidence=w.deliveries[0].SerializeToString(),
    )


def _params(job: Job, st: Statement, r: _Rows, k: int) -> Sequence[Any]:
    """The parameters of ``st`` in ``job`` for batch ``k`` (a list of tuples, or of keys
    for an IN list, or one tuple for a read)."""
    lo, hi = k * r.batch, min((k + 1) * r.batch, len(r.shams))
    s = r.shams[lo:hi]
    now = time.time()
    size = hi - lo
    ev = r.evidence
    both = [*r.delivery_ids[lo:hi], *r.handover_ids[lo:hi]]
    key = (job.name, st.name)
    table: dict[tuple[str, str], Callable[[], Sequence[Any]]] = {
        # hub
        ("accept", "look up letters"): lambda: s,
        ("accept", "insert letters"): lambda: [
            (x, A, r.digest, now, pb.LETTER_KIND_LETTER, None, 0) for x in s
        ],
        ("accept", "insert envelopes"): lambda: [(x, r.envelope) for x in s],
        ("accept", "insert queue"): lambda: [(B, x, now, None) for x in s],
        ("accept", "insert evidence"): lambda: [
            (i, x, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, ev, now)
            for i, x in zip(r.relay_ids[lo:hi], s, strict=True)
        ],
        ("accept", "insert recipient_state"): lambda: [(x, B, lifecycle.RELAYED) for x in s],
        ("accept", "upsert sender_sequences"): lambda: [(A, "O", 2026, hi)],
        ("queue page", "read queue sizes"): lambda: (B, lo, now, size),
        ("queue page", "read queue rows"): lambda: (B, lo, now, hi, size),
        ("record_receipts", "look up letters of receipts"): lambda: s,
        ("record_receipts", "look up evidence ids"): lambda: both,
        ("record_receipts", "insert evidence"): lambda: [
            (i, x, e, ev, now)
            for e, ids in (
                (E.EVIDENCE_EVENT_DELIVERY, r.delivery_ids),
                (E.EVIDENCE_EVENT_HANDOVER, r.handover_ids),
            )
            for i, x in zip(ids[lo:hi], s, strict=True)
        ],
        ("record_receipts", "delete queue"): lambda: [(B, x) for x in s],
        ("record_receipts", "insert notices"): lambda: [(A, i, ev) for i in both],
        ("record_receipts", "update recipient_state"): lambda: [
            (lifecycle.HANDED_OVER, _RECEIPT_BITS, x, B) for x in s
        ],
        ("notices page", "read notices"): lambda: (A, 2 * lo, 2 * size),
        ("ack_notices_later", "mark notices acknowledged"): lambda: [(1.0, A, i) for i in both],
        # sender node
        ("submit", "look up request ids"): lambda: r.request_keys[lo:hi],
        ("submit", "insert counter"): lambda: [(A, "O", 2026)],
        ("submit", "update counter"): lambda: (size, A, "O", 2026),
        ("submit", "insert outbox"): lambda: [
            (x, q, b"d" * 32, r.stored_envelope, r.digest, r.receipt, now)
            for x, q in zip(s, r.request_keys[lo:hi], strict=True)
        ],
        ("submit", "insert bodies"): lambda: [(x, r.body) for x in s],
        ("submit", "insert evidence"): lambda: [
            (i, x, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, ev, now)
            for i, x in zip(r.submission_ids[lo:hi], s, strict=True)
        ],
        ("submit", "insert recipient_state"): lambda: [(x, B, lifecycle.SUBMITTED) for x in s],
        ("outbox page", "read outbox sizes"): lambda: (lo, size),
        ("outbox page", "read outbox rows"): lambda: (lo, hi, size),
        ("record_sender_evidence (relay)", "look up evidence ids"): lambda: r.relay_ids[lo:hi],
        ("record_sender_evidence (relay)", "insert evidence"): lambda: [
            (i, x, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, ev, now)
            for i, x in zip(r.relay_ids[lo:hi], s, strict=True)
        ],
        ("record_sender_evidence (relay)", "update outbox"): lambda: [(x,) for x in s],
        ("record_sender_evidence (relay)", "read letters and states"): lambda: s,
        ("record_sender_evidence (relay)", "update recipient_state"): lambda: [
            (lifecycle.RELAYED, x, B) for x in s
        ],
        ("record_sender_evidence (notices)", "look up evidence ids"): lambda: both,
        ("record_sender_evidence (notices)", "insert evidence"): lambda: [
            (i, x, e, ev, now)
            for e, ids in (
                (E.EVIDENCE_EVENT_DELIVERY, r.delivery_ids),
                (E.EVIDENCE_EVENT_HANDOVER, r.handover_ids),
            )
            for i, x in zip(ids[lo:hi], s, strict=True)
        ],
        ("record_sender_evidence (notices)", "read letters and states"): lambda: s,
        ("record_sender_evidence (notices)", "update recipient_state"): lambda: [
            (lifecycle.HANDED_OVER, x, B) for x in s
        ],
        # recipient node
        ("store_incoming", "look up inbox"): lambda: [(x,) for x in s],
        ("store_incoming", "insert inbox"): lambda: [
            (x, A, "", r.stored_envelope, ev, now) for x in s
        ],
        ("store_incoming", "insert bodies"): lambda: [(x, r.body) for x in s],
        ("store_incoming", "insert evidence"): lambda: [
            (i, x, E.EVIDENCE_EVENT_DELIVERY, ev, now)
            for i, x in zip(r.delivery_ids[lo:hi], s, strict=True)
        ],
        ("inbox page", "read inbox sizes"): lambda: (lo, size),
        ("inbox page", "read inbox rows"): lambda: (lo, hi, size),
        ("inbox_entries", "read inbox entries"): lambda: s,
        ("record_handovers", "update inbox"): lambda: [(ev, x) for x in s],
        ("record_handovers", "insert evidence"): lambda: [
            (i, x, E.EVIDENCE_EVENT_HANDOVER, ev, now)
            for i, x in zip(r.handover_ids[lo:hi], s, strict=True)
        ],
        # The HANDOVER rows: every DELIVERY row before them was marked sent already.
        ("receipts_after", "read receipts to send"): lambda: (2 * lo + size, size),
        ("receipts_acknowledged_later", "mark receipts sent"): lambda: [(now, i) for i in both],
    }
    return table[key]()


def _connect(path: Path, migrations: Sequence[str] | None) -> sqlite3.Connection:
    """A connection as ``Database`` opens one: the real pragmas, then the migrations."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in _pragmas("full"):
        conn.execute(pragma)
    if migrations is not None:
        for number, script in enumerate(migrations, start=1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
    return conn


def _run_store(
    jobs: Sequence[Job], migrations: Sequence[str], r: _Rows, directory: Path, name: str
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """Runs every job for every batch, in order; returns CPU microseconds a row (key, or
    row read) of each statement, and a COMMIT of each job."""
    path = directory / f"{name}.db"
    writer = _connect(path, migrations)
    reader = _connect(path, None)
    batches = -(-len(r.shams) // r.batch)
    params = {
        (job.name, st.name, k): _params(job, st, r, k)
        for k in range(batches)
        for job in jobs
        for st in job.statements
    }
    spent: dict[tuple[str, str], float] = dict.fromkeys(
        ((j.name, s.name) for j in jobs for s in j.statements), 0.0
    )
    units: dict[tuple[str, str], int] = dict.fromkeys(spent, 0)
    commits: dict[str, float] = {j.name: 0.0 for j in jobs if j.commit}
    clock = time.process_time
    for k in range(batches):
        for job in jobs:
            conn = reader if job.reader else writer
            if not job.reader:
                conn.execute("BEGIN IMMEDIATE")
            for st in job.statements:
                p = params[(job.name, st.name, k)]
                if st.mode == "in":
                    sql = st.sql.format(marks=",".join("?" * len(p)))
                    extra = (B,) if "s.recipient = ?" in st.sql else ()
                    t = clock()
                    conn.execute(sql, (*extra, *p)).fetchall()
                    spent[(job.name, st.name)] += clock() - t
                    units[(job.name, st.name)] += len(p)
                elif st.mode == "read":
                    t = clock()
                    got = conn.execute(st.sql, p).fetchall()
                    spent[(job.name, st.name)] += clock() - t
                    units[(job.name, st.name)] += max(1, len(got))
                elif st.mode == "point" and isinstance(p, tuple):
                    t = clock()
                    conn.execute(st.sql, p).fetchall()
                    spent[(job.name, st.name)] += clock() - t
                    units[(job.name, st.name)] += 1
                elif st.mode == "point":
                    t = clock()
                    for one in p:
                        conn.execute(st.sql, one).fetchone()
                    spent[(job.name, st.name)] += clock() - t
                    units[(job.name, st.name)] += len(p)
                else:
                    t = clock()
                    conn.executemany(st.sql, p)
                    spent[(job.name, st.name)] += clock() - t
                    units[(job.name, st.name)] += len(p)
            if not job.reader:
                t = clock()
                conn.execute("COMMIT")
                if job.commit:
                    commits[job.name] += clock() - t
    writer.close()
    reader.close()
    per_row = {key: spent[key] * 1e6 / units[key] if units[key] else 0.0 for key in spent}
    per_commit = {name: t * 1e6 / batches for name, t in commits.items()}
    return per_row, per_commit


# -- gRPC -------------------------------------------------------------------------------------


def _transport(
    pki: PkiLayout, small: int, large: int, seconds: float, workdir: Path
) -> dict[str, float]:
    """Each end's CPU a raw gRPC message, fitted as fixed + per byte over two sizes."""
    from loadtest.baseline import measure_between

    async def both() -> list[dict[str, float]]:
        return [
            await measure_between(pki, (A, B), b"x" * size, seconds=seconds, workdir=workdir)
            for size in (small, large)
        ]

    lo, hi = asyncio.run(both())
    out: dict[str, float] = {"small_bytes": small, "large_bytes": large}
    for side in ("sender", "receiver"):
        a, b = lo[f"{side}_cpu_ms_per_message"] * 1000, hi[f"{side}_cpu_ms_per_message"] * 1000
        per_byte = max(0.0, (b - a) / (large - small))
        out[f"{side}_fixed_us"] = max(0.0, a - per_byte * small)
        out[f"{side}_us_per_byte"] = per_byte
    out["messages_small"], out["messages_large"] = lo["messages"], hi["messages"]
    return out


def _flows(f: _Frames) -> list[tuple[str, str, str, list[bytes]]]:
    """(frame, writer, reader, its serialised frames) of each message of the path."""
    return [
        ("submission frame", LOAD, SENDER, f.submit),
        ("submission answer", SENDER, LOAD, f.submit_answer),
        ("envelopes to the hub", SENDER, HUB, f.envelopes),
        ("relay results", HUB, SENDER, f.relay_results),
        ("deliveries", HUB, RECIPIENT, f.envelopes),
        ("receipts to the hub", RECIPIENT, HUB, f.receipts),
        ("receipt acks", HUB, RECIPIENT, f.id_acks),
        ("notices to the sender", HUB, SENDER, f.notices),
        ("evidence acks", SENDER, HUB, f.id_acks),
        ("inbox frame", RECIPIENT, LOAD, f.inbox),
        ("ack frame", LOAD, RECIPIENT, f.ack),
        ("ack answer", RECIPIENT, LOAD, f.ack_answer),
    ]


# -- the report -----------------------------------------------------------------------------


def _item(
    process: str, item: str, count: float, us_each: float, where: str, kind: str
) -> dict[str, Any]:
    return {
        "process": process,
        "kind": kind,
        "item": item,
        "count_per_letter": count,
        "us_each": us_each,
        "us_per_letter": count * us_each,
        "where": where,
    }


_KIND_OF = (
    ("parse", "protobuf"),
    ("serialise", "protobuf"),
    ("build", "protobuf"),
    ("SHA-256", "crypto"),
    ("seal", "crypto"),
    ("sign", "crypto"),
    ("verify", "crypto"),
    ("inclusion", "crypto"),
)


def _kind(op: str) -> str:
    return next((k for prefix, k in _KIND_OF if op.startswith(prefix)), "other")


def measure(
    letters: int = 16384,
    batch: int = 256,
    transport_seconds: float = 2.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The floor's report (see the module docstring)."""
    from loadtest.machine import machine

    with tempfile.TemporaryDirectory(prefix="chapar-floor-") as tmp:
        root = Path(tmp) if workdir is None else workdir
        pki = init_pki(root / "pki", hub=HUB_NAME, agencies=[A, B])
        world = _world(pki, letters, batch)
        frames = _frames(world)
        ops = _measure_ops(world, frames)
        items: list[dict[str, Any]] = []
        per_batch = {"sign tree head", "verify tree head"}
        for process, op, count, where in _COUNTED:
            each = count / batch if op in per_batch else count
            name = f"{op} (per batch of {batch})" if op in per_batch else op
            items.append(_item(process, name, each, ops[op], where, _kind(op)))
        excluded = [
            {**_item(process, op, count, ops[op], where, _kind(op)), "reason": reason}
            for process, op, count, where, reason in _EXCLUDED
        ]
        rows = _rows(world)
        stores = (
            (hub_jobs(), hub_store.MIGRATIONS, "hub"),
            (sender_jobs(batch), node_store.MIGRATIONS, "sender"),
            (recipient_jobs(), node_store.MIGRATIONS, "recipient"),
        )
        for jobs, migrations, name in stores:
            per_row, per_commit = _run_store(jobs, migrations, rows, root, name)
            for job in jobs:
                for st in job.statements:
                    items.append(
                        _item(
                            job.process,
                            f"SQL {job.name}: {st.name}",
                            st.rows,
                            per_row[(job.name, st.name)],
                            job.where,
                            "sqlite",
                        )
                    )
                if job.commit:
                    items.append(
                        _item(
                            job.process,
                            f"SQL {job.name}: COMMIT (per batch of {batch})",
                            1 / batch,
                            per_commit[job.name],
                            job.where,
                            "sqlite",
                        )
                    )
        transport: dict[str, Any] = {"measured": False}
        if transport_seconds > 0:
            sizes = [len(raw) for _, _, _, frames_ in _flows(frames) for raw in frames_[:1]]
            transport = {
                "measured": True,
                "how": "loadtest.baseline: raw grpc.aio mTLS stream between two processes, one"
                " message a write, flat out; each end's CPU a message fitted as fixed + per byte",
                **_transport(pki, min(sizes), max(sizes), transport_seconds, root),
            }
            for name, writer, reader, raws in _flows(frames):
                size = sum(len(x) for x in raws) / len(raws)
                for process, side, verb in (
                    (writer, "sender", "write"),
                    (reader, "receiver", "read"),
                ):
                    each = transport[f"{side}_fixed_us"] + transport[f"{side}_us_per_byte"] * size
                    items.append(
                        _item(
                            process,
                            f"gRPC {verb} {name} ({size / 1024:.0f} KiB, per frame of {batch})",
                            1 / batch,
                            each,
                            "loadtest/baseline.py:measure_baseline",
                            "grpc",
                        )
                    )
    per_process = {
        p: sum(i["us_per_letter"] for i in items if i["process"] == p) for p in PROCESSES
    }
    per_kind: dict[str, float] = {}
    for i in items:
        per_kind[i["kind"]] = per_kind.get(i["kind"], 0.0) + i["us_per_letter"]
    return {
        "machine": machine(),
        "letters": letters,
        "batch": batch,
        "body_bytes": BODY_BYTES,
        "items": items,
        "per_process_us": per_process,
        "per_kind_us": per_kind,
        "total_us_per_letter": sum(per_process.values()),
        "budget_us_per_letter": BUDGET_US,
        "excluded": excluded,
        "excluded_us_per_letter": sum(i["us_per_letter"] for i in excluded),
        "checks": {
            "inclusion proof, whole batch (us a letter)": ops["inclusion proof, whole batch"],
            "inclusion proof, alone (us a letter)": ops["inclusion proof, alone"],
            "TrustStore.verify_envelopes a member (us)": ops[
                "TrustStore.verify_envelopes a member"
            ],
            "sign tree head (us)": ops["sign tree head"],
            "verify tree head (us)": ops["verify tree head"],
        },
        "transport": transport,
    }


def table(report: dict[str, Any]) -> str:
    lines = []
    for process in PROCESSES:
        lines.append(f"\n{process}")
        lines.append(f"  {'item':<66} {'count':>8} {'us each':>9} {'us/letter':>10}")
        for i in report["items"]:
            if i["process"] == process:
                lines.append(
                    f"  {i['item'][:66]:<66} {i['count_per_letter']:>8.4g} {i['us_each']:>9.2f}"
                    f" {i['us_per_letter']:>10.2f}"
                )
        lines.append(f"  {'total':<66} {'':>8} {'':>9} {report['per_process_us'][process]:>10.1f}")
    lines.append(
        "\nper kind: " + ", ".join(f"{k} {v:.1f} us" for k, v in report["per_kind_us"].items())
    )
    lines.append(
        "per process: " + ", ".join(f"{p} {v:.1f} us" for p, v in report["per_process_us"].items())
    )
    lines.append(
        f"floor: {report['total_us_per_letter']:.1f} us of CPU a letter against a budget of"
        f" {report['budget_us_per_letter']:.0f} us ({report['total_us_per_letter'] / report['budget_us_per_letter']:.0%})"
        + ("" if report["transport"]["measured"] else "; gRPC not measured")
    )
    lines.append(
        f"not counted (listed under excluded): {report['excluded_us_per_letter']:.1f} us a letter"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.floor", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--letters", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--transport-seconds",
        type=float,
        default=2.0,
        help="seconds of each raw gRPC measurement (0: leave gRPC out)",
    )
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args(argv)
    if ns.letters < 1 or not 2 <= ns.batch <= 256 or ns.transport_seconds < 0:
        ap.error("letters must be positive, batch 2 to 256 (a signed tree's leaves at most)")
    report = measure(ns.letters, ns.batch, ns.transport_seconds)
    print(table(report))
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
