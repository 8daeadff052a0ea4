"""Interop: an independent gRPC client, in JavaScript, talks to real nodes and the hub.

``tests/interop/client.mjs`` uses @grpc/grpc-js (not grpcio) with stubs that
@grpc/proto-loader reads from ``proto/`` at run time, and builds, signs and verifies with
``node:crypto`` what the contracts describe. It plays agency A's back-end (drafts to B,
A's inbox, acknowledgements, errors) and the node of agency C, which has no Python node in
the test cluster (letters it signs itself, relayed by the hub to B). The Python SDK is the
other side: B sends to the JS back-end, and B's back-end reads and verifies every letter
the JavaScript side sent or signed.

Attachments go both ways: the JS back-end uploads a file (DocumentService, in several
chunks, size and SHA-256 announced) and attaches it to a letter to B, whose back-end saves
it through B's node; B attaches a file of its own to a letter to A, which the JS back-end
downloads through A's node. Both are checked against the signed reference and the
original bytes. An upload whose content is not the SHA-256 announced is refused
(DATA_LOSS, DIGEST_MISMATCH), and nothing is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import status_pb2

from client_sdk import Draft, ExchangeClient, Letter, pb
from client_sdk.trust import TrustStore
from node.cluster import Cluster
from node.demo import EXPECTED_CHAIN, wait_for_chain
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C, client_credentials, db_count

pytestmark = pytest.mark.integration

NODE = shutil.which("node")
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "interop" / "client.mjs"
HUB = "urn:chapar:hub:national"


def _urn(code: str) -> str:
    return f"urn:chapar:agency:{code}"


def _write_config(cluster: Cluster, tmp_path: Path, **settings: Any) -> Path:
    """The JS client's configuration: addresses, certificate files, what to send."""
    backend = client_credentials(cluster, AGENCY_A, "interop-js")
    (tmp_path / "backend.crt").write_bytes(backend.certificate_chain)
    (tmp_path / "backend.key").write_bytes(backend.private_key)
    c = cluster.pki.agency_dir(AGENCY_C)
    config = {
        "root_ca": str(cluster.pki.root_cert),
        # google/rpc/*.proto, for the error details: googleapis-common-protos ships them.
        "googleapis_dir": str(Path(status_pb2.__file__).parents[2]),
        "timeout_s": 40,
        "server_name": "localhost",
        "backend": {
            "address": cluster.nodes[AGENCY_A].address,
            "cert": str(tmp_path / "backend.crt"),
            "key": str(tmp_path / "backend.key"),
            **settings["backend"],
        },
        "node": {
            "hub_address": cluster.hub.address,
            "agency": AGENCY_C,
            "tls_cert": str(c / "tls.crt"),
            "tls_key": str(c / "tls.key"),
            "signing_cert": str(c / "signing.crt"),
            "signing_key": str(c / "signing.key"),
            **settings["node"],
        },
    }
    path = tmp_path / "interop.json"
    path.write_text(json.dumps(config, ensure_ascii=False))
    return path


async def _read_and_ack(
    client: ExchangeClient, trust: TrustStore, mailbox: str, count: int
) -> dict[str, Letter]:
    """Reads ``count`` letters from the mailbox; each must verify before it is acknowledged."""
    got: dict[str, Letter] = {}
    async for letter in client.inbox(mailbox=mailbox):
        letter.verify(trust)  # raises VerificationError: the test fails here
        await letter.ack()
        got[letter.shams] = letter
        if len(got) == count:
            return got
    raise AssertionError("inbox stream ended")


ALGORITHMS = {
    "ed25519": "SIGNATURE_ALGORITHM_ED25519",
    "ecdsa-p256": "SIGNATURE_ALGORITHM_ECDSA_P256_SHA256",
}


@pytest.fixture(params=list(ALGORITHMS))
def signing_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    """The shared cluster (Ed25519 signing keys), or one of its own whose agencies and hub
    sign with ECDSA P-256, so that the JS side signs and verifies both."""
    algorithm = ALGORITHMS[request.param]
    if request.param == "ed25519":
        yield request.getfixturevalue("cluster"), algorithm
        return
    started = asyncio.run(
        Cluster.start(
            tmp_path_factory.mktemp("interop-ecdsa"),
            [AGENCY_A, AGENCY_B, AGENCY_C],
            signing_algorithm="ecdsa-p256",
            without_node=[AGENCY_C],
        )
    )
    try:
        yield started, algorithm
    finally:
        codes = started.stop()
        assert set(codes.values()) == {0}, codes


@pytest.mark.skipif(NODE is None, reason="needs `node` (Node.js 20): the interop client is JS")
async def test_a_grpc_js_client_interoperates_with_nodes_and_hub(
    signing_cluster: tuple[Cluster, str], tmp_path: Path
) -> None:
    cluster, algorithm = signing_cluster
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "node_modules lacks @grpc/grpc-js: run `make test` (or `npm install`) first"
    )
    run = uuid.uuid4().hex[:8]
    js_mailbox, py_mailbox = f"interop-js-{run}", f"interop-py-{run}"
    # A few hundred KiB each, new every run (so stored anew): the JS side uploads the first
    # in several chunks, B's back-end the second.
    from_js_file, to_js_file = tmp_path / "from-js.pdf", tmp_path / "to-js.pdf"
    from_js_file.write_bytes(os.urandom(300 * 1024 + 77))
    to_js_file.write_bytes(os.urandom(200 * 1024 + 5))
    from_backend: list[dict[str, Any]] = [
        {"subject": f"JS back-end → Python {i} ({run})", "body": f"Nội dung {i}"} for i in range(2)
    ]
    from_backend[1]["attachment"] = {
        "path": str(from_js_file),
        "media_type": "application/pdf",
        "file_name": "Báo cáo JS.pdf",
    }
    alone = [{"subject": f"JS-signed alone ({run})", "body": f"{algorithm} from node:crypto"}]
    batch = [{"subject": f"JS-signed batch {i} ({run})", "body": f"leaf {i}"} for i in range(3)]

    async with ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b:
        to_js_ref = await b.upload(to_js_file, media_type="application/pdf", file_name="گزارش.pdf")
        to_js = [
            Draft(
                to=[(AGENCY_A, js_mailbox)],
                subject=f"Python → JS {i} ({run})",
                body=f"Kính gửi: Văn phòng {i}. سلام",
                attachments=[to_js_ref] if i == 1 else [],
            )
            for i in range(2)
        ]
        receipts = await b.send_many(to_js)  # one call: the node signs them as one batch
        sent_shams = [r.shams for r in receipts if not isinstance(r, Exception)]
        assert len(sent_shams) == 2, receipts
        config = _write_config(
            cluster,
            tmp_path,
            backend={
                "inbox_mailbox": js_mailbox,
                "expect": sent_shams,
                "send": {"to": AGENCY_B, "mailbox": py_mailbox, "letters": from_backend},
            },
            node={
                "to": AGENCY_B,
                "mailbox": py_mailbox,
                # C has no node to number its letters: the JS node does, from a fresh range
                # each run (a number used before with other content is SHAMS_REUSED).
                "sequence": 3_000_000 + (uuid.uuid4().int % 100_000) * 10,
                "letters_alone": alone,
                "letters_batch": batch,
            },
        )
        trust = cluster.credentials(AGENCY_B).trust_store()
        trust.add_certificates(c for a in await b.agencies() for c in a.signing_certificates)
        # B's back-end reads what the JS side sends while the JS side waits for the HANDOVER
        # evidence of its letters: both at once.
        report, received = await _run_js(
            config, _read_and_ack(b, trust, py_mailbox, len(from_backend + alone + batch))
        )

        backend, node = report["backend"], report["node"]
        _check_errors(backend["errors"])
        _check_backend(backend, algorithm, sent_shams, to_js, js_mailbox, to_js_file.read_bytes())
        _check_node(node, cluster, algorithm, [x["subject"] for x in alone + batch])

        # What the JS side submitted or signed reached B's back-end and verified there
        # (``_read_and_ack``), as it was written.
        bodies = {x["subject"]: x["body"] for x in from_backend + alone + batch}
        from_a = {s["shams"] for s in backend["submitted"]}
        from_c = {s["shams"]: s for s in node["sent"]}
        assert set(received) == from_a | set(from_c)
        for shams, letter in received.items():
            assert letter.text == bodies[letter.subject]
            assert letter.recipients == (AGENCY_B,)
            assert letter.header.recipients[0].mailbox == py_mailbox
            if shams in from_a:  # a draft: A's node numbered and signed it
                assert letter.sender == AGENCY_A
                assert letter.header.priority == pb.Priority.PRIORITY_URGENT
            else:  # signed in JS, alone or in a Merkle batch
                assert letter.sender == AGENCY_C
                assert letter.envelope.signature.algorithm == pb.SignatureAlgorithm.Value(algorithm)
                signed_in_batch = from_c[shams]["signed"] == "batch"
                assert letter.envelope.HasField("batch_proof") == signed_in_batch
                assert letter.header.metadata.signer_name == "grpc-js"

        # The JS back-end's upload, attached to its second letter: B's back-end saves it
        # through B's node (which fetches it from A's through the hub); ``save`` checks size
        # and SHA-256 against the signed reference, and the bytes are the file's.
        content = from_js_file.read_bytes()
        digest = hashlib.sha256(content).digest()
        uploaded = backend["submitted"][1]["attachments"]
        assert [(u["sha256"], u["size"], u["existed"]) for u in uploaded] == [
            (digest.hex(), len(content), False)
        ]
        assert uploaded[0]["chunks"] >= 3
        assert [len(s["attachments"]) for s in backend["submitted"]] == [0, 1]
        (with_file,) = (x for x in received.values() if x.header.attachments)
        assert with_file.subject == from_backend[1]["subject"]
        (attachment,) = with_file.attachments
        assert (attachment.uri, attachment.sha256, attachment.size) == (
            f"chapar://{AGENCY_A}/documents/sha256/{digest.hex()}",
            digest,
            len(content),
        )
        assert uploaded[0]["uri"] == attachment.uri
        assert (attachment.media_type, attachment.file_name) == (
            "application/pdf",
            "Báo cáo JS.pdf",
        )
        saved = await attachment.save(tmp_path / "saved-from-js.pdf")
        assert saved.read_bytes() == content

        # B's letters to the JS back-end: handed over, every evidence verifies in Python.
        for shams in sent_shams:
            tracking = await wait_for_chain(b, shams)
            verified = tracking.verify(trust)
            assert [v.event for v in verified][: len(EXPECTED_CHAIN)] == list(EXPECTED_CHAIN)
            assert tracking.statuses == {AGENCY_A: "HANDED_OVER"}


async def _run_js(
    config: Path, python_side: Coroutine[Any, Any, dict[str, Letter]]
) -> tuple[dict[str, Any], dict[str, Letter]]:
    """Runs the JS client alongside ``python_side``; its JSON report and what the other
    side returned. Whichever side fails first fails the test, with the JS side's output."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        str(config),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    other = asyncio.create_task(python_side)
    js = asyncio.create_task(proc.communicate())
    await asyncio.wait({other, js}, timeout=90, return_when=asyncio.FIRST_COMPLETED)
    if other.done() and other.exception() is not None:
        proc.kill()  # the JS side would only wait for what the Python side failed to do
        await js
        other.result()
    try:
        out, err = await asyncio.wait_for(js, 90)
    finally:
        if proc.returncode is None:
            proc.kill()
    if proc.returncode != 0:
        other.cancel()
        raise AssertionError(f"JS client failed:\n{out.decode()}\n{err.decode()}")
    report: dict[str, Any] = json.loads(out)
    print(f"JS side: {report['elapsed_ms']} ms")
    return report, await asyncio.wait_for(other, 30)


def _check_errors(errors: list[dict[str, Any]]) -> None:
    """The bad requests: code and google.rpc.Status from the trailer, decoded in JS."""
    unknown, malformed, bad_digest = errors
    assert (unknown["code"], unknown["code_name"], unknown["status_code"]) == (5, "NOT_FOUND", 5)
    assert (unknown["domain"], unknown["reason"]) == ("chapar.exchange", "UNKNOWN_RECIPIENT")
    assert unknown["metadata"] == {"agency": "NO.SUCH.AGENCY"}
    assert (malformed["code"], malformed["reason"]) == (3, "INVALID_AGENCY_CODE")
    assert malformed["field_violations"] == ["draft.recipients[0].agency"]  # BadRequest
    # An upload whose content is not the SHA-256 its header announced: refused at its end,
    # after the header was accepted and the chunks sent; StatDocument then finds nothing
    # stored under the content's own digest.
    assert (bad_digest["code_name"], bad_digest["status_code"]) == ("DATA_LOSS", 15)
    assert (bad_digest["domain"], bad_digest["reason"]) == ("chapar.exchange", "DIGEST_MISMATCH")
    assert bad_digest["metadata"] == {
        "expected": bad_digest["announced_sha256"],
        "actual": bad_digest["content_sha256"],
    }
    assert bad_digest["announced_sha256"] != bad_digest["content_sha256"]
    assert (bad_digest["header_accepted"], bad_digest["chunks"]) == (True, 2)
    assert bad_digest["stored_after"] is False


def _check_backend(
    backend: dict[str, Any],
    algorithm: str,
    sent_shams: list[str],
    to_js: list[Draft],
    js_mailbox: str,
    to_js_content: bytes,
) -> None:
    """What the JS back-end of A verified: its receipts, B's letters, the whole trail, and
    the attachment of B's second letter, downloaded through A's node."""
    for submitted in backend["submitted"]:  # two drafts in one call: one signed batch
        evidence = submitted["evidence"]
        assert (evidence["event"], evidence["issuer"]) == ("SUBMISSION_ACCEPTANCE", _urn(AGENCY_A))
        assert evidence["tree_size"] == 2
    assert len(backend["submitted"]) == 2

    assert [r["shams"] for r in backend["received"]] == sent_shams
    for got, draft in zip(backend["received"], to_js, strict=True):
        assert (got["sender"], got["subject"], got["body"]) == (AGENCY_B, draft.subject, draft.body)
        assert got["recipients"] == [[AGENCY_A, js_mailbox]]
        assert got["verified"]
        assert (got["signature_algorithm"], got["envelope_batch"], got["tree_size"]) == (
            algorithm,
            True,
            2,
        )
        assert got["tampered_header_refused"] == "SIGNATURE_INVALID"  # JS's own check bites
        for name, event in (("delivery", "DELIVERY"), ("handover", "HANDOVER")):
            assert (got[name]["event"], got[name]["issuer"]) == (event, _urn(AGENCY_A))
        assert got["handover"]["tree_size"] == 2  # acknowledged in one batch
        # Each attachment as the header signs it, and what the download gave: the JS side
        # checked it against the reference already; here, against the file B uploaded.
        assert got["attachments"] == [
            {
                "uri": ref.uri,
                "sha256": ref.sha256.hex(),
                "size": ref.size,
                "media_type": ref.media_type,
                "file_name": ref.file_name,
                "downloaded_sha256": hashlib.sha256(to_js_content).hexdigest(),
                "downloaded_size": len(to_js_content),
                "verified": True,
            }
            for ref in draft.attachments
        ]
        assert got["short_attachment_refused"] == ["ATTACHMENT_MISMATCH"] * len(draft.attachments)
    assert [len(got["attachments"]) for got in backend["received"]] == [0, 1]

    assert len(backend["tracked"]) == 2
    for tracked in backend["tracked"]:  # verified in JS from the root CA alone
        assert {e["event"]: e["issuer"] for e in tracked["evidence"]} == {
            "SUBMISSION_ACCEPTANCE": _urn(AGENCY_A),
            "RELAY_ACCEPTANCE": HUB,
            "DELIVERY": _urn(AGENCY_B),
            "HANDOVER": _urn(AGENCY_B),
        }
        assert tracked["statuses"] == [[AGENCY_B, "HANDED_OVER"]]


def _check_node(
    node: dict[str, Any], cluster: Cluster, algorithm: str, subjects: list[str]
) -> None:
    """What the JS node of C signed, and the evidence that came back for it."""
    assert node["algorithm"] == algorithm
    assert [s["subject"] for s in node["sent"]] == subjects
    assert [(s["signed"], s["tree_size"]) for s in node["sent"]] == [("alone", 1)] + [
        ("batch", 3)
    ] * 3
    shams = {s["shams"] for s in node["sent"]}
    by_event: dict[str, set[str]] = {}
    for e in node["evidence"]:
        by_event.setdefault(e["event"], set()).add(e["shams"])
        issuer = HUB if e["event"] == "RELAY_ACCEPTANCE" else _urn(AGENCY_B)
        assert (e["issuer"], e["recipient"], e["verified"]) == (issuer, AGENCY_B, True)
    assert by_event == dict.fromkeys(("RELAY_ACCEPTANCE", "DELIVERY", "HANDOVER"), shams)

    # The letter whose signature the JS node broke on purpose: refused with a signed
    # RELAY_REJECTION and the reason, stored nowhere.
    refused = node["refused"]
    assert (refused["event"], refused["reason"], refused["issuer"]) == (
        "RELAY_REJECTION",
        "SIGNATURE_INVALID",
        HUB,
    )
    inbox = cluster.root / f"node-{AGENCY_B}" / "node.db"
    sql = "SELECT count(*) FROM inbox WHERE shams = ?"
    assert db_count(inbox, sql, (refused["shams"],)) == 0
