"""``chapar demo``: a hub and two agency nodes on loopback exchanging signed letters.

Agency A (a Vietnamese organ code) writes to agency B (an Iranian 11-digit legal-entity
id), attaching a PDF: the file goes to A's document store and only its address travels with
the letter. B receives and acknowledges it, downloads the attachment through its own node
(which fetches it from A through the hub and checks its SHA-256), reports the business
status ACCEPTED on it (a signed status update) and answers with a reply; A receives both. For each
letter the sender's evidence chain (SUBMISSION_ACCEPTANCE, RELAY_ACCEPTANCE, DELIVERY,
HANDOVER) is fetched and every signature verified against the root CA alone; the letter's
correspondence tree, as the hub recorded it (the letter, B's status update and B's reply),
is asked through A's node and verified; the letter's evidence bundle is saved and verified
again from the file, as an auditor would. Exit status 0 only if every chain verified and
the attachment arrived intact. Numbers are shown as people quote them, with their check
character (``000.00.00.G22/O/2026/0000001:L``), as the client commands print them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import tempfile
from pathlib import Path

from client_sdk import ExchangeClient, Tracking, format_shams_checked, pb
from client_sdk.trust import TrustStore, VerificationError
from node.cli_output import OutputFailed, emit
from node.cluster import Cluster

__all__ = ["AGENCY_A", "AGENCY_B", "EXPECTED_CHAIN", "run_demo", "wait_for_chain"]

# What a standard output that fails leaves undone (``| head -3``: the reader went).
_UNDONE = "the demo could not print its account; it stopped there, and stopped its servers"

AGENCY_A = "000.00.00.G22"
AGENCY_B = "10861234567"
EXPECTED_CHAIN = ("SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE", "DELIVERY", "HANDOVER")


def _n(shams: str) -> str:
    """A number as the demo shows it: with its check character."""
    return format_shams_checked(shams)


def _say(text: str, undone: str = _UNDONE) -> None:
    """Prints ``text`` and flushes it: each line out as the demo goes. An output that
    fails ends the demo (``OutputFailed``, one line from ``chapar``), its servers stopped."""
    emit([text], undone)


async def wait_for_chain(client: ExchangeClient, shams: str, timeout: float = 30.0) -> Tracking:
    """Polls ``track`` until the letter's evidence holds every event of EXPECTED_CHAIN."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        tracking = await client.track(shams)
        events = {
            pb.EvidenceEvent.Name(pb.EvidenceContent.FromString(e.content).event).removeprefix(
                "EVIDENCE_EVENT_"
            )
            for e in tracking.evidence
        }
        if set(EXPECTED_CHAIN) <= events:
            return tracking
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{shams}: evidence so far {sorted(events)}")
        await asyncio.sleep(0.1)


def _print_chain(title: str, shams: str, tracking: Tracking, trust: TrustStore) -> bool:
    _say(f"\n{title}\n  SHAMS {_n(shams)}")
    try:
        verified = tracking.verify(trust)
    except VerificationError as exc:
        _say(f"  VERIFICATION FAILED: {exc.reason}: {exc}")
        return False
    for item in verified:
        _say(
            f"  {item.event:<22} by {item.issuer:<34} {item.event_time:%H:%M:%S.%f}  signature verified"
        )
    events = [v.event for v in verified]
    missing = [e for e in EXPECTED_CHAIN if e not in events]
    if missing:
        _say(f"  MISSING: {', '.join(missing)}")
        return False
    return True


async def _business_status(client: ExchangeClient, shams: str, trust: TrustStore) -> bool:
    """Waits for B's ACCEPTED to reach A and be linked to A's letter, then verifies it."""
    deadline = asyncio.get_running_loop().time() + 30
    while (tracking := await client.track(shams)).business_statuses.get(AGENCY_B) is None:
        if asyncio.get_running_loop().time() > deadline:
            _say(f"\nBusiness status of {_n(shams)}: MISSING")
            return False
        await asyncio.sleep(0.1)
    try:
        tracking.verify(trust)
    except VerificationError as exc:
        _say(f"\nBusiness status of {_n(shams)}: VERIFICATION FAILED: {exc.reason}: {exc}")
        return False
    (update,) = tracking.status_updates
    _say(
        f"\nBusiness status of {_n(shams)}: {AGENCY_B} {tracking.business_statuses[AGENCY_B]}"
        f" (status update {_n(update.shams)}, its sender's signature and its link to the letter"
        " verified)"
    )
    return True


async def _correspondence(client: ExchangeClient, shams: str, trust: TrustStore) -> bool:
    """The letter's correspondence tree as the hub recorded it (DESIGN section 6), asked
    through A's node, each letter's signed header and evidence verified."""
    tree = await client.track_correspondence(shams)
    try:
        verified = tree.verify(trust)
    except VerificationError as exc:
        _say(f"\nCorrespondence of {_n(shams)}: VERIFICATION FAILED: {exc.reason}: {exc}")
        return False
    _say(f"\nCorrespondence of {_n(shams)} at the hub ({len(verified)} evidence verified):")
    for depth, letter in tree.walk():
        what = letter.status or letter.kind or "?"
        _say(
            f"  {'  ' * depth}{_n(letter.shams)}  {what:<13} {letter.sender} -> "
            f"{', '.join(letter.recipients)}  signed header verified"
        )
    return len(tree.letters) == 3  # the letter, B's status update and B's reply


async def _audit(client: ExchangeClient, shams: str, path: Path, root: Path) -> bool:
    """Saves the letter's evidence bundle, then verifies the file with the root CA alone,
    as an auditor would later (``chapar verify FILE --ca ROOT``)."""
    return _saved_and_verified(shams, await client.evidence_bundle(shams), path, root)


def _saved_and_verified(shams: str, bundle: pb.EvidenceBundle, path: Path, root: Path) -> bool:
    path.write_bytes(bundle.SerializeToString())
    try:
        kept = Tracking.from_bundle(path.read_bytes()).verify(TrustStore.from_pem_files(root))
    except VerificationError as exc:
        _say(f"\nEvidence bundle {path.name}: VERIFICATION FAILED: {exc.reason}: {exc}")
        return False
    _say(
        f"\nEvidence bundle of {_n(shams)} saved ({path.stat().st_size} bytes, {len(kept)} "
        "evidence): verified again from the file with the root CA alone"
    )
    return True


def _sample_pdf(path: Path) -> Path:
    """A small, valid one-page PDF (the demo's attachment)."""
    text = b"BT /F1 18 Tf 72 720 Td (Budget report 2026) Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(out))
    return path


async def _exchange(cluster: Cluster) -> bool:
    creds_a = cluster.credentials(AGENCY_A)
    creds_b = cluster.credentials(AGENCY_B)
    ok = True
    files = cluster.root / "files"
    files.mkdir(exist_ok=True)
    report = _sample_pdf(files / "budget-report-2026.pdf")
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, creds_a) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, creds_b) as b,
    ):
        letter = await a.send(
            to=[AGENCY_B],
            subject="Yêu cầu phối hợp — request for cooperation",
            body="Kính gửi: please confirm the figures of the 2026 budget report.\n",
            attachments=[report],
        )
        _say(f"A ({AGENCY_A}) sent {_n(letter.shams)} with the attachment {report.name}")
        inbox = b.inbox()
        received = await anext(inbox)
        _say(
            f"B ({AGENCY_B}) received {_n(received.shams)} from {received.sender}:"
            f" {received.subject}"
        )
        for attachment in received.attachments:
            _say(f"  attachment {attachment.uri} ({attachment.size} bytes)")
            saved = await attachment.save(files / f"received-{attachment.safe_file_name}")
            intact = hashlib.sha256(saved.read_bytes()).digest() == attachment.sha256
            ok = intact and saved.read_bytes() == report.read_bytes() and ok
            _say(
                f"  saved to {saved}: "
                + ("arrived intact, SHA-256 verified" if intact else "CORRUPTED")
            )
        if not received.attachments:
            _say("  the attachment is MISSING")
            ok = False
        await received.ack()
        accepted = await b.send_status(received.shams, "accepted", "Taken up by the budget desk.")
        _say(f"B reported ACCEPTED on {_n(received.shams)} (status update {_n(accepted.shams)})")
        reply = await b.send(
            to=[AGENCY_A],
            subject="Re: request for cooperation",
            kind="reply",
            in_reply_to=received.shams,
            body="The figures are confirmed.\n",
        )
        _say(f"B replied {_n(reply.shams)} (in reply to {_n(received.shams)})")
        expected = {accepted.shams, reply.shams}
        async with contextlib.aclosing(a.inbox()) as a_inbox:
            async for got in a_inbox:  # B's status update and its reply, in either order
                about = _n(got.in_reply_to) if got.in_reply_to else "-"
                if got.status is not None:
                    _say(f"A received {_n(got.shams)}: B's status {got.status} on {about}")
                else:
                    _say(f"A received {_n(got.shams)} in reply to {about}")
                await got.ack()
                expected.discard(got.shams)
                if not expected:
                    break
        for title, client, receipt, creds in (
            ("Letter A -> B", a, letter, creds_a),
            ("Reply B -> A", b, reply, creds_b),
        ):
            tracking = await wait_for_chain(client, receipt.shams)
            ok = _print_chain(title, receipt.shams, tracking, creds.trust_store()) and ok
        ok = await _business_status(a, letter.shams, creds_a.trust_store()) and ok
        ok = await _correspondence(a, letter.shams, creds_a.trust_store()) and ok
        ok = await _audit(a, letter.shams, files / "letter.bundle", cluster.pki.root_cert) and ok
        with contextlib.suppress(Exception):
            await inbox.aclose()
    return ok


async def run_demo(serve_dir: Path | None = None) -> int:
    with contextlib.ExitStack() as stack:
        root = (
            serve_dir
            if serve_dir is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        _say(
            f"Starting a hub and two agency nodes on loopback in {root} ...",
            "the demo could not print its account; it started no server",
        )
        cluster = await Cluster.start(root, [AGENCY_A, AGENCY_B])
        output_failed = False
        try:
            _say(
                f"hub {cluster.hub.address}; node {AGENCY_A} {cluster.nodes[AGENCY_A].address}; "
                f"node {AGENCY_B} {cluster.nodes[AGENCY_B].address}"
            )
            ok = await _exchange(cluster)
            _say(
                "\nAll evidence chains verified." if ok else "\nSome evidence chain did NOT verify."
            )
            if serve_dir is not None:
                cluster.write_addresses(serve_dir / "addresses.json")
                metrics = [f"hub {cluster.hub.metrics}"] + [
                    f"node {code} {p.metrics}" for code, p in cluster.nodes.items()
                ]
                _say("Prometheus metrics: " + "; ".join(metrics))
                _say(
                    f"\nServers keep running; addresses in {serve_dir / 'addresses.json'}. "
                    f"Try: chapar send --demo {serve_dir} --agency {AGENCY_A} --to {AGENCY_B} "
                    "--subject hello --body hi\nPress Ctrl-C to stop."
                )
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
        except OutputFailed:
            output_failed = True  # nothing more to say: no one reads it
            raise
        finally:
            codes = cluster.stop()
            if not output_failed:
                _say("Stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()))
    return 0 if ok else 1
