"""Evidence signed in batches: Merkle inclusion proofs (RFC 9162) under one signature.

Each evidence of a batch must verify on its own, exactly like one signed alone, and no
change to content, proof or signature may pass, whether or not the batch's signature was
already seen (the verifier caches verified tree heads).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from certs.pki import PkiLayout, init_pki, load_certs
from client_sdk import pb
from client_sdk.signing import (
    MAX_EVIDENCE_BATCH,
    Signer,
    merkle_leaf,
    merkle_paths_hold,
    merkle_root_from_path,
    merkle_tree,
)
from client_sdk.trust import (
    TrustStore,
    VerificationError,
    datetime_of,
    seconds_of,
    set_timestamp,
)

HUB = "hub.test"
AGENCY = "000.00.00.G22"


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 MTH written straight from its definition (no paths), to check against."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    left, right = _reference_root(leaves[:k]), _reference_root(leaves[k:])
    return hashlib.sha256(b"\x01" + left + right).digest()


def _leaves(n: int) -> list[bytes]:
    return [merkle_leaf(f"evidence {i}".encode()) for i in range(n)]


@pytest.mark.parametrize("size", [*range(1, 18), 31, 32, 33, 100, 256])
def test_every_leaf_proves_into_the_reference_root(size: int) -> None:
    leaves = _leaves(size)
    root, paths = merkle_tree(leaves)
    assert root == _reference_root(leaves)
    for index, (leaf, path) in enumerate(zip(leaves, paths, strict=True)):
        assert merkle_root_from_path(leaf, index, size, path) == root


@given(st.integers(min_value=2, max_value=70), st.data())
def test_a_proof_does_not_fit_another_leaf_index_or_size(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    root, paths = merkle_tree(leaves)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    other = data.draw(st.integers(min_value=0, max_value=size - 1).filter(lambda i: i != index))
    path = paths[index]
    assert merkle_root_from_path(leaves[other], index, size, path) != root
    assert merkle_root_from_path(leaves[index], other, size, path) != root
    # (A different tree size can lead to the same root for some leaves: that is why the
    # signature covers the size with the root; see test_any_change_fails... "size".)
    if path:
        assert merkle_root_from_path(leaves[index], index, size, path[:-1]) != root
        flipped = bytes([path[0][0] ^ 1]) + path[0][1:]
        assert merkle_root_from_path(leaves[index], index, size, [flipped, *path[1:]]) != root
    assert merkle_root_from_path(leaves[index], index, size, [*path, root]) != root


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100])
def test_a_whole_tree_holds_only_with_every_path_exact(size: int) -> None:
    leaves = _leaves(size)
    root, paths = merkle_tree(leaves)
    assert merkle_paths_hold(leaves, paths) == root
    assert merkle_paths_hold(leaves, paths[:-1]) is None
    for i in {0, size // 2, size - 1}:
        if paths[i]:
            wrong = [list(p) for p in paths]
            wrong[i][-1] = bytes(32)
            assert merkle_paths_hold(leaves, wrong) is None
        if size > 1:
            swapped = list(leaves)
            swapped[i], swapped[(i + 1) % size] = swapped[(i + 1) % size], swapped[i]
            assert merkle_paths_hold(swapped, paths) is None


def test_malformed_proofs_are_refused() -> None:
    leaf = merkle_leaf(b"x")
    assert merkle_root_from_path(leaf, 0, 0, []) is None  # empty tree
    assert merkle_root_from_path(leaf, 3, 3, [leaf, leaf]) is None  # index outside
    assert merkle_root_from_path(leaf, 0, 2, [b"short"]) is None  # not a hash
    assert merkle_root_from_path(leaf, 0, 2, []) is None  # path too short for the size
    assert merkle_root_from_path(leaf, 0, 1 << 40, [leaf]) is None  # absurd size


# -- signing and verifying with real certificates ---------------------------------------------


@pytest.fixture(scope="module", params=["ed25519", "ecdsa-p256"])
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp(f"batch-{request.param}") / "pki",
        hub=HUB,
        agencies=[AGENCY],
        signing_algorithm=request.param,
    )


def _signer(pki: PkiLayout) -> Signer:
    directory = pki.agency_dir(AGENCY)
    return Signer.from_files(directory / "signing.key", directory / "signing.crt")


def _trust(pki: PkiLayout, signer: Signer) -> TrustStore:
    store = TrustStore(
        roots=load_certs(pki.root_cert), intermediates=load_certs(pki.intermediate_cert)
    )
    store.add_certificates([signer.certificate])
    return store


def _content(i: int) -> bytes:
    content = pb.EvidenceContent(
        evidence_id=f"id-{i}",
        event=pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
        issuer=f"urn:chapar:agency:{AGENCY}",
        recipient=AGENCY,
    )
    content.event_time.GetCurrentTime()
    return content.SerializeToString()


def test_a_batch_has_one_signature_and_each_evidence_verifies_alone(pki: PkiLayout) -> None:
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(7)])
    assert len({e.signature.value for e in batch}) == 1
    assert all(e.HasField("batch_proof") for e in batch)
    for i, evidence in enumerate(batch):
        # A fresh store each time: nothing cached from the other members.
        content = _trust(pki, signer).verify_evidence(evidence)
        assert content.evidence_id == f"id-{i}"


def test_one_evidence_alone_is_signed_as_before(pki: PkiLayout) -> None:
    signer = _signer(pki)
    (single,) = signer.sign_evidence([_content(0)])
    assert not single.HasField("batch_proof")
    assert _trust(pki, signer).verify_evidence(single).evidence_id == "id-0"


def test_evidence_sealed_again_holds_only_its_new_proof(pki: PkiLayout) -> None:
    # Signatures and proofs are set field by field in place: sealing evidence again (in
    # another batch, or alone) must replace the old proof's path, not add to it.
    signer = _signer(pki)
    contents = [_content(i) for i in range(7)]
    items = [pb.Evidence(content=c) for c in contents]
    signer.seal_evidence(items)
    signer.seal_evidence(items[:3])
    signer.seal_evidence(items[3:4])
    fresh = [pb.Evidence(content=c) for c in contents[:4]]
    signer.seal_evidence(fresh[:3])
    signer.seal_evidence(fresh[3:])
    # (ECDSA signatures differ from one signing to the next: the proofs are compared.)
    assert [e.batch_proof for e in items[:4]] == [e.batch_proof for e in fresh]
    assert not items[3].HasField("batch_proof")
    trust = _trust(pki, signer)
    ids = [trust.verify_evidence(e).evidence_id for e in items[:4]]
    assert ids == [f"id-{i}" for i in range(4)]


def test_big_batches_are_split_into_trees_of_bounded_size(pki: PkiLayout) -> None:
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(MAX_EVIDENCE_BATCH + 3)])
    assert {e.batch_proof.tree_size for e in batch} == {MAX_EVIDENCE_BATCH, 3}
    assert len({e.signature.value for e in batch}) == 2
    trust = _trust(pki, signer)
    assert [trust.verify_evidence(e).evidence_id for e in batch][
        -1
    ] == f"id-{MAX_EVIDENCE_BATCH + 2}"


def _tampered(evidence: pb.Evidence, how: str, other: pb.Evidence) -> pb.Evidence:
    forged = pb.Evidence()
    forged.CopyFrom(evidence)
    if how == "content":
        content = pb.EvidenceContent.FromString(evidence.content)
        content.recipient = "SOMEONE.ELSE"
        forged.content = content.SerializeToString()
    elif how == "index":
        forged.batch_proof.leaf_index = (evidence.batch_proof.leaf_index + 1) % 7
    elif how == "path":
        forged.batch_proof.path[0] = bytes(32)
    elif how == "size":
        forged.batch_proof.tree_size = 8
    elif how == "other-batch-signature":
        forged.signature.CopyFrom(other.signature)
    elif how == "proof-dropped":
        forged.ClearField("batch_proof")
    return forged


@pytest.mark.parametrize(
    "how", ["content", "index", "path", "size", "other-batch-signature", "proof-dropped"]
)
def test_any_change_fails_even_after_the_batch_verified(pki: PkiLayout, how: str) -> None:
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(7)])
    other = signer.sign_evidence([_content(i) for i in range(100, 103)])
    trust = _trust(pki, signer)
    for evidence in batch:  # fills the verified-tree-head cache
        trust.verify_evidence(evidence)
    with pytest.raises(VerificationError) as info:
        trust.verify_evidence(_tampered(batch[2], how, other[0]))
    assert info.value.reason in {"SIGNATURE_INVALID", "EVIDENCE_PROOF_INVALID"}


def test_a_cached_batch_still_fails_once_its_signer_is_revoked(pki: PkiLayout) -> None:
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(4)])
    trust = _trust(pki, signer)
    trust.verify_evidence(batch[0])
    trust.set_revoked([signer.certificate.serial_number])
    with pytest.raises(VerificationError) as info:
        trust.verify_evidence(batch[1])
    assert info.value.reason == "CERTIFICATE_REVOKED"


@given(
    st.integers(min_value=-62_135_596_800, max_value=253_402_300_799),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_seconds_of_a_timestamp_is_what_todatetime_says(seconds: int, nanos: int) -> None:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    expected = ts.ToDatetime(tzinfo=dt.UTC).timestamp()
    # ToDatetime keeps microseconds (up to 1 us less), and far from 1970 a float's own
    # resolution is coarser than that (4 us at 2**34 s): allow both, nothing more.
    assert abs(seconds_of(ts) - expected) <= 1e-6 + 2 * math.ulp(expected)


# -- envelopes signed in batches -----------------------------------------------------------


def _envelopes(n: int, start: int = 0) -> list[pb.Envelope]:
    out = []
    for i in range(start, start + n):
        body = f"letter {i}".encode()
        header = pb.EnvelopeHeader(
            shams=pb.Shams(origin=AGENCY, year=2026, sequence=i + 1),
            sender=pb.Address(agency=AGENCY),
            recipients=[pb.Address(agency="000.00.00.B01")],
            subject=f"subject {i}",
            body_sha256=hashlib.sha256(body).digest(),
            body_size=len(body),
        )
        out.append(pb.Envelope(header=header.SerializeToString(), body=body))
    return out


def test_a_submitted_batch_of_envelopes_has_one_signature_and_each_verifies_alone(
    pki: PkiLayout,
) -> None:
    signer = _signer(pki)
    envelopes = _envelopes(5)
    signer.seal_envelopes(envelopes)
    assert len({e.signature.value for e in envelopes}) == 1
    assert [e.batch_proof.leaf_index for e in envelopes] == [0, 1, 2, 3, 4]
    for i, envelope in enumerate(envelopes):
        header = _trust(pki, signer).verify_envelope(envelope)  # a fresh cache each time
        assert header.subject == f"subject {i}"
    (single,) = lone = _envelopes(1)
    signer.seal_envelopes(lone)
    assert not single.HasField("batch_proof")
    assert _trust(pki, signer).verify_envelope(single).subject == "subject 0"


@pytest.mark.parametrize(
    "how", ["header", "index", "path", "size", "other-batch-signature", "proof-dropped"]
)
def test_any_change_to_a_batched_envelope_fails_after_its_batch_verified(
    pki: PkiLayout, how: str
) -> None:
    signer = _signer(pki)
    envelopes, others = _envelopes(7), _envelopes(3, start=100)
    signer.seal_envelopes(envelopes)
    signer.seal_envelopes(others)
    trust = _trust(pki, signer)
    for envelope in envelopes:  # fills the verified-tree-head cache
        trust.verify_envelope(envelope)
    forged = pb.Envelope()
    forged.CopyFrom(envelopes[2])
    if how == "header":
        header = pb.EnvelopeHeader.FromString(forged.header)
        header.subject = "forged"
        forged.header = header.SerializeToString()
    elif how == "index":
        forged.batch_proof.leaf_index = 3
    elif how == "path":
        forged.batch_proof.path[0] = bytes(32)
    elif how == "size":
        forged.batch_proof.tree_size = 8
    elif how == "other-batch-signature":
        forged.signature.CopyFrom(others[0].signature)
    elif how == "proof-dropped":
        forged.ClearField("batch_proof")
    with pytest.raises(VerificationError) as info:
        trust.verify_envelope(forged)
    assert info.value.reason in {"SIGNATURE_INVALID", "ENVELOPE_PROOF_INVALID"}


def test_an_evidence_batch_signature_never_passes_for_envelopes(pki: PkiLayout) -> None:
    """Same key, same leaf bytes, same tree: only the signed payload type differs, and the
    verifier's cache of verified tree heads must not let one kind stand for the other."""
    signer = _signer(pki)
    evidence = signer.sign_evidence([_content(i) for i in range(4)])
    trust = _trust(pki, signer)
    for item in evidence:  # caches the tree head as a verified evidence batch
        trust.verify_evidence(item)
    for item in evidence:
        envelope = pb.Envelope(
            header=item.content, signature=item.signature, batch_proof=item.batch_proof
        )
        with pytest.raises(VerificationError) as info:
            trust.verify_envelope(envelope, check_body=False)
        assert info.value.reason == "SIGNATURE_INVALID"


@given(
    st.integers(min_value=-62_135_596_800, max_value=253_402_300_799),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_datetime_of_a_timestamp_is_exactly_what_todatetime_says(seconds: int, nanos: int) -> None:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    assert datetime_of(ts) == ts.ToDatetime(tzinfo=dt.UTC)
    assert datetime_of(ts).tzinfo is dt.UTC


@given(
    st.datetimes(
        timezones=st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=3, minutes=30))])
    )
)
def test_set_timestamp_gives_exactly_what_fromdatetime_gives(when: dt.datetime) -> None:
    ours, theirs = Timestamp(), Timestamp()
    set_timestamp(ours, when)
    theirs.FromDatetime(when)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)


# -- verifying many at once ------------------------------------------------------------------


def _outcome(result: pb.EvidenceContent | pb.EnvelopeHeader | VerificationError) -> str:
    if isinstance(result, VerificationError):
        return f"error {result.reason}"
    if isinstance(result, pb.EvidenceContent):
        return result.evidence_id
    return result.subject


def _one_by_one(
    verify: Callable[[Any], pb.EvidenceContent | pb.EnvelopeHeader], items: Sequence[Any]
) -> list[str]:
    """Each item's outcome when verified alone, in order."""
    out = []
    for item in items:
        try:
            out.append(_outcome(verify(item)))
        except VerificationError as exc:
            out.append(_outcome(exc))
    return out


_HOW = ["content", "index", "path", "size", "other-batch-signature", "proof-dropped"]


@given(st.data())
def test_many_at_once_says_what_one_by_one_says(pki: PkiLayout, data: st.DataObject) -> None:
    """Whole batches, parts of batches, repeats, strays and forgeries, in any order: each
    item's outcome is the one it gets alone, from a store that has seen nothing yet."""
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(7)])
    other = signer.sign_evidence([_content(i) for i in range(100, 103)])
    (single,) = signer.sign_evidence([_content(200)])
    pool = [*batch, *other, single]
    items = data.draw(st.lists(st.sampled_from(pool), max_size=14))
    if data.draw(st.booleans()):
        items = [*batch, *items]  # a whole batch, so the batch path is taken
    items = data.draw(st.permutations(items))
    for _ in range(data.draw(st.integers(min_value=0, max_value=2))):
        if items:
            at = data.draw(st.integers(min_value=0, max_value=len(items) - 1))
            how = data.draw(st.sampled_from(_HOW))
            if how == "path" and not items[at].batch_proof.path:
                how = "content"  # a lone item has no path to change
            items = [*items[:at], _tampered(items[at], how, other[0]), *items[at + 1 :]]
    many = [_outcome(r) for r in _trust(pki, signer).verify_evidence_many(items)]
    assert many == _one_by_one(_trust(pki, signer).verify_evidence, items)


@pytest.mark.parametrize("how", _HOW)
def test_a_forged_member_of_a_whole_batch_fails_and_the_rest_verify(
    pki: PkiLayout, how: str
) -> None:
    signer = _signer(pki)
    batch = signer.sign_evidence([_content(i) for i in range(7)])
    other = signer.sign_evidence([_content(i) for i in range(100, 103)])
    items = [*batch[:2], _tampered(batch[2], how, other[0]), *batch[3:]]
    outcomes = [_outcome(r) for r in _trust(pki, signer).verify_evidence_many(items)]
    assert outcomes[2] in {"error SIGNATURE_INVALID", "error EVIDENCE_PROOF_INVALID"}
    assert outcomes[:2] + outcomes[3:] == [f"id-{i}" for i in (0, 1, 3, 4, 5, 6)]


def test_envelopes_many_at_once_match_one_by_one(pki: PkiLayout) -> None:
    signer = _signer(pki)
    envelopes, others = _envelopes(6), _envelopes(3, start=100)
    signer.seal_envelopes(envelopes)
    signer.seal_envelopes(others)
    forged = pb.Envelope()
    forged.CopyFrom(envelopes[4])
    forged.batch_proof.path[0] = bytes(32)
    cut = pb.Envelope()
    cut.CopyFrom(envelopes[1])
    cut.body = b"not the signed body"
    items = [*others[:2], *envelopes[:4], forged, envelopes[5], cut]
    trust = _trust(pki, signer)
    many = [_outcome(r) for r in trust.verify_envelopes(items)]
    assert many == _one_by_one(_trust(pki, signer).verify_envelope, items)
    assert many[6] in {"error SIGNATURE_INVALID", "error ENVELOPE_PROOF_INVALID"}
    assert many[8] == "error BODY_DIGEST_MISMATCH"
    assert [*many[:6], many[7]] == [f"subject {i}" for i in (100, 101, 0, 1, 2, 3, 5)]
