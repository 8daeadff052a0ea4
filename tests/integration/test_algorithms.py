"""Signing algorithm agility: the whole path with ECDSA P-256 agency and hub signing keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_sdk import ExchangeClient, pb
from node.cluster import Cluster
from node.demo import EXPECTED_CHAIN, wait_for_chain

pytestmark = pytest.mark.integration


async def test_ecdsa_p256_signed_letters_and_evidence_verify_end_to_end(tmp_path: Path) -> None:
    cluster = await Cluster.start(
        tmp_path,
        ["AGENCY-E1", "AGENCY-E2"],
        signing_algorithm="ecdsa-p256",
        node_settings="",
        hub_settings="",
    )
    try:
        async with (
            ExchangeClient(
                cluster.nodes["AGENCY-E1"].address, cluster.credentials("AGENCY-E1")
            ) as a,
            ExchangeClient(
                cluster.nodes["AGENCY-E2"].address, cluster.credentials("AGENCY-E2")
            ) as b,
        ):
            receipt = await a.send(to=["AGENCY-E2"], subject="ECDSA", body="signed with P-256")
            assert receipt.evidence.signature.algorithm == (
                pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
            )
            async for letter in b.inbox():
                assert letter.shams == receipt.shams
                assert letter.envelope.signature.algorithm == (
                    pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
                )
                await letter.ack()
                break
            tracking = await wait_for_chain(a, receipt.shams)
            events = [
                v.event for v in tracking.verify(cluster.credentials("AGENCY-E1").trust_store())
            ]
            assert events[: len(EXPECTED_CHAIN)] == list(EXPECTED_CHAIN)
    finally:
        assert set(cluster.stop().values()) == {0}
