"""Who is on the other end of a call: the identity in the peer's TLS client certificate.

The TLS layer has already checked the chain against our root CA; here we read the
certificate grpc hands us (``x509_pem_cert``), check its usage and revocation with the
trust store, and take the identity from its SAN URI, never from the CN or a message field.
"""

from __future__ import annotations

import grpc
from cryptography import x509

from client_sdk.identity import Identity
from client_sdk.trust import TrustStore, VerificationError
from node.core.errors import ChaparError, Code
from node.metrics import count_verification_failure

__all__ = ["peer_certificate", "peer_identity"]


def peer_identity(context: grpc.aio.ServicerContext, trust: TrustStore) -> Identity:
    return peer_certificate(context, trust)[1]


def peer_certificate(
    context: grpc.aio.ServicerContext, trust: TrustStore
) -> tuple[x509.Certificate, Identity]:
    """The peer's verified TLS certificate and its identity; UNAUTHENTICATED otherwise."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise ChaparError(
            Code.UNAUTHENTICATED, "NO_CLIENT_CERTIFICATE", "a client certificate is required"
        )
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        return cert, trust.verify_certificate(cert, "tls")
    except VerificationError as exc:
        count_verification_failure("certificate", exc.reason)
        raise ChaparError(
            Code.UNAUTHENTICATED, exc.reason, f"client certificate refused: {exc}"
        ) from exc
    except ValueError as exc:
        raise ChaparError(
            Code.UNAUTHENTICATED, "CERTIFICATE_MALFORMED", "client certificate unreadable"
        ) from exc
