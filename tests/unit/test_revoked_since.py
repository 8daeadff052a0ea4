"""A revocation may say from when: what the key signed before stands.

A certificate retired in the ordinary way (staff change, key rotation, a node
decommissioned) is revoked from a time T on (RFC 5280's revocation date): evidence and
letters signed before T still verify, as of their own time; what is signed at or after T
does not, and every live check (asked at now) refuses it from T on. A revocation with no
time is for all time, as before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from certs.pki import init_pki, load_certs
from client_sdk import pb
from client_sdk.signing import Signer
from client_sdk.trust import TrustStore, VerificationError, set_timestamp
from node.config import ConfigError, read_revocation_times, read_revocations
from node.rpc.side import SideServiceAdmission
from node.server import revocations_coming_due

AGENCY = "000.00.00.G22"
NOW = dt.datetime.now(dt.UTC)
# Inside the test PKI's validity (from 5 minutes before it is made): taken from the
# certificate, not from NOW, which is read when the module is collected, minutes before
# a test of a whole suite makes its PKI (the evidence was then signed before its key).
SIGNED_AFTER_ISSUE = dt.timedelta(minutes=3)


def _setup(tmp_path: Path) -> tuple[TrustStore, Signer, x509.Certificate, pb.Evidence]:
    layout = init_pki(tmp_path / "pki", hub="national", agencies=[AGENCY])
    folder = layout.agency_dir(AGENCY)
    signer = Signer.from_files(folder / "signing.key", folder / "signing.crt")
    intermediate = load_certs(layout.intermediate_cert)[0]
    trust = TrustStore(load_certs(layout.root_cert), [intermediate])
    trust.add_certificates([signer.certificate])
    content = pb.EvidenceContent(
        evidence_id="e1",
        event=pb.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
        issuer=f"urn:chapar:agency:{AGENCY}",
    )
    set_timestamp(content.event_time, _signed_at(signer))
    [evidence] = signer.sign_evidence([content.SerializeToString()])
    return trust, signer, intermediate, evidence


def _signed_at(signer: Signer) -> dt.datetime:
    return signer.certificate.not_valid_before_utc + SIGNED_AFTER_ISSUE


def _reason(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except VerificationError as exc:
        return exc.reason
    return "OK"


@pytest.mark.parametrize("whose", ["signer", "intermediate CA"])
def test_evidence_signed_before_the_revocations_time_verifies_after_it_not_before(
    tmp_path: Path, whose: str
) -> None:
    trust, signer, intermediate, evidence = _setup(tmp_path)
    serial = (signer.certificate if whose == "signer" else intermediate).serial_number
    signed_at = _signed_at(signer)
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"  # and its chain cached
    trust.set_revoked([serial], since={serial: signed_at + dt.timedelta(minutes=1)})
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"
    trust.set_revoked([serial], since={serial: signed_at})  # at its very time: revoked
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([serial], since={serial: signed_at - dt.timedelta(minutes=1)})
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([serial])  # no time: for all time, as before
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([])
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"


@pytest.mark.parametrize("whose", ["signer", "intermediate CA"])
def test_a_live_check_at_now_passes_before_the_revocations_time_and_refuses_after(
    tmp_path: Path, whose: str
) -> None:
    trust, signer, intermediate, _ = _setup(tmp_path)
    cert = signer.certificate
    serial = (cert if whose == "signer" else intermediate).serial_number
    live = lambda: trust.verify_certificate(cert, "signing")  # noqa: E731
    assert _reason(live) == "OK"
    trust.set_revoked([serial], since={serial: NOW + dt.timedelta(hours=1)})  # scheduled
    assert _reason(live) == "OK"
    assert not trust.chain_revoked(cert)
    trust.set_revoked([serial], since={serial: NOW - dt.timedelta(seconds=1)})
    assert _reason(live) == "CERTIFICATE_REVOKED"
    assert trust.chain_revoked(cert)
    snapshot = trust.snapshot()  # what /metrics' threads read keeps the time
    assert snapshot.chain_revoked(cert)
    trust.set_revoked([serial], since={serial: NOW + dt.timedelta(hours=1)})
    assert not trust.snapshot().chain_revoked(cert)
    assert trust.chain_revoked(cert, at=NOW + dt.timedelta(hours=2))


def test_revocations_added_to_those_held_keep_the_earlier_of_two() -> None:
    trust = TrustStore([])
    early, late = NOW - dt.timedelta(days=2), NOW - dt.timedelta(days=1)
    trust.set_revoked([1, 2], since={2: late, 3: late, 4: early})
    trust.add_revoked([3, 5], since={1: early, 2: early, 4: late, 6: late})
    assert trust.revoked_serials == {1, 2, 3, 4, 5, 6}
    assert trust.revoked_since == {2: early, 4: early, 6: late}  # 1, 3, 5: for all time


def test_a_revocation_file_line_may_give_a_time_from_which_on_it_is_revoked(
    tmp_path: Path,
) -> None:
    file = tmp_path / "revoked.txt"
    file.write_text(
        "0abc  # a key stolen: for all time\n"
        "DEF 2026-03-01T00:00:00Z  # retired\n"
        "0x12 2026-03-01T03:30:00+03:30\n"
        "def 2026-02-01T00:00:00Z  # listed twice: the earlier counts\n"
        "abc 2026-01-01T00:00:00Z  # listed with no time too: for all time\n"
    )
    assert read_revocations(file) == ["0abc", "def", "12", "def", "abc"]  # every one listed
    assert read_revocation_times(file) == {
        "def": dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
        "12": dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
    }


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("0abc 2026-03-01", "'2026-03-01'"),  # no time of day, no offset
        ("0abc 2026-03-01T00:00:00", "'2026-03-01T00:00:00'"),  # no offset: whose midnight?
        ("0abc yesterday", "'yesterday'"),
        ("0abc 2026-03-01T00:00:00Z extra", "'extra'"),
    ],
)
def test_a_revocation_file_line_whose_time_is_no_time_is_refused_with_its_number(
    tmp_path: Path, line: str, named: str
) -> None:
    file = tmp_path / "revoked.txt"
    file.write_text(f"0def\n{line}  # note\n")
    for read in (read_revocations, read_revocation_times):
        with pytest.raises(ConfigError, match=f"line 2: .*{named}"):
            read(file)


async def test_the_hub_publishes_the_times_and_keeps_them_through_a_restart(
    tmp_path: Path,
) -> None:
    # As test_review_node_changes' test of a mistyped path: the revocations in force (their
    # times too) stay in force through a restart while the configured file is missing.
    import json

    from node.cluster import Cluster
    from node.config import load_hub_config
    from node.hub import Hub, build_directory
    from node.server import _read_tls, _signer, _trust
    from node.storage.hub_store import HubStore

    cluster = Cluster.prepare(tmp_path, [AGENCY, "10861234567"])
    config_path = cluster.hub.config

    def configure(path: Path) -> None:
        lines = [
            line
            for line in config_path.read_text().splitlines()
            if not line.startswith("revocation_file")
        ]
        lines.insert(lines.index("[hub]") + 1, f"revocation_file = {json.dumps(str(path))}")
        config_path.write_text("\n".join(lines) + "\n")

    async def start(store: HubStore) -> Hub:  # as node.server.serve_hub builds and starts it
        config = load_hub_config(config_path)
        signer = _signer(config.signing, config.identity)
        trust = _trust(_read_tls(config.tls, config.identity), config.signing)
        hub = Hub(config, store, signer, trust, build_directory(config, signer, []), config_path)
        await hub.start()
        started.append(hub)
        return hub

    def published(hub: Hub) -> tuple[list[str], dict[str, int], dict[int, dt.datetime]]:
        message = hub.directory.message
        times = {r.serial: r.since.seconds for r in message.revocations}
        return list(message.revoked_serials), times, hub.trust.revoked_since

    started: list[Hub] = []
    since = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    expected = (["0a1b2c", "0d0e0f"], {"0a1b2c": int(since.timestamp())}, {0x0A1B2C: since})
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("0a1b2c 2026-03-01T00:00:00Z  # retired\n0d0e0f\n")
    configure(revoked)
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        hub = await start(store)
        assert published(hub) == expected
        configure(tmp_path / "revokd.txt")  # the operator's slip, in the running hub
        hub._sources = ()
        await hub.reload_if_changed()
        assert published(hub) == expected  # kept, logged
        await hub.stop()
        restarted = await start(store)  # the file still missing
        assert published(restarted) == expected
        await restarted.reload_if_changed()
        assert published(restarted) == expected
        configure(revoked)
        revoked.write_text("0a1b2c  # stolen after all\n0d0e0f\n")
        await restarted.reload_if_changed()
        assert published(restarted) == (["0a1b2c", "0d0e0f"], {}, {})
    finally:
        for each in started:
            await each.stop()
        await store.close()


def test_chapar_pki_revoke_since_writes_the_time_and_a_later_revocation_without_one_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from certs import cli

    layout = init_pki(tmp_path / "pki", hub="national", agencies=[AGENCY])
    cert = layout.agency_dir(AGENCY) / "signing.crt"
    serial = f"{load_certs(cert)[0].serial_number:x}"
    file = tmp_path / "revoked.txt"
    revoke = ["pki", "revoke", "--file", str(file), str(cert)]
    assert cli.main([*revoke, "--since", "2026-03-01T03:30:00+03:30"]) == 0
    assert "from 2026-03-01T00:00:00Z on" in capsys.readouterr().out
    assert read_revocation_times(file) == {serial: dt.datetime(2026, 3, 1, tzinfo=dt.UTC)}
    assert cli.main([*revoke, "--since", "2026-04-01T00:00:00Z"]) == 0  # later: no change
    assert "was already in" in capsys.readouterr().out
    assert cli.main([*revoke, "--since", "2026-02-01T00:00:00Z"]) == 0  # earlier: counts
    assert read_revocation_times(file) == {serial: dt.datetime(2026, 2, 1, tzinfo=dt.UTC)}
    assert cli.main(revoke) == 0  # stolen after all: for all time
    assert read_revocation_times(file) == {}
    assert read_revocations(file) == [serial] * 3
    assert cli.main(revoke) == 0
    assert "was already in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        cli.main([*revoke, "--since", "2026-03-01"])
    assert refused.value.code == 2
    assert "not an RFC 3339 time" in capsys.readouterr().err


async def test_streams_end_when_each_scheduled_revocation_comes_due_until_cancelled(
    tmp_path: Path,
) -> None:
    """A server runs the trust store's listeners again when a revocation scheduled for a
    time ahead comes due (node.server.revocations_coming_due), so that a stream admitted
    before it ends then, not at the next directory change: here the side services'
    (health Watch, reflection), whose listener ends the streams of a revoked chain. One
    timer, armed again for the next time; none once cancelled."""
    trust, signer, intermediate, _ = _setup(tmp_path)
    side = SideServiceAdmission(trust)
    first, second, after = asyncio.Event(), asyncio.Event(), asyncio.Event()
    side._streams[first] = signer.certificate
    side._streams[second] = intermediate
    cancel = revocations_coming_due(trust)
    try:
        now = dt.datetime.now(dt.UTC)
        trust.set_revoked(
            [],
            since={
                signer.certificate.serial_number: now + dt.timedelta(seconds=0.3),
                intermediate.serial_number: now + dt.timedelta(seconds=0.6),
            },
        )
        assert not first.is_set()
        await asyncio.wait_for(first.wait(), 2)
        assert dt.datetime.now(dt.UTC) >= now + dt.timedelta(seconds=0.3)
        assert not second.is_set()
        await asyncio.wait_for(second.wait(), 2)
        assert dt.datetime.now(dt.UTC) >= now + dt.timedelta(seconds=0.6)
    finally:
        cancel()
    del side._streams[first], side._streams[second]
    side._streams[after] = signer.certificate
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.2)
    trust.set_revoked([], since={signer.certificate.serial_number: soon})
    await asyncio.sleep(0.5)
    assert not after.is_set()  # cancelled: nothing runs the listeners at its time
    assert trust.chain_revoked(signer.certificate)
