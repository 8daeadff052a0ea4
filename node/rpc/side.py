"""The side services of a server's port (gRPC health checking and server reflection) admit
what the trust store admits, as the roles' own services do.

The TLS layer admits any certificate that chains to ``[tls] ca``; it knows nothing of the
directory's revocations. The hub's and node's servicers check every caller with the trust
store (``peer_certificate``), but health and reflection are grpc's own servicers: a revoked
certificate (or one under a revoked CA) was still served by them. This interceptor refuses
it: UNAUTHENTICATED / ``CERTIFICATE_REVOKED``. Any other certificate of the CA is served, as
before (an operator's or a load balancer's, with or without a Chapar identity): the state of
an agency in the directory is not asked, as a suspended agency's node may still read the
directory to learn its state. ``/metrics`` with ``metrics_tls`` applies the same
``revocation`` (node.server).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from client_sdk.trust import TrustStore
from node.core.errors import ChaparError, Code
from node.rpc.errors import abort

__all__ = ["SIDE_SERVICES", "SideServiceAdmission", "revocation"]

SIDE_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def revocation(certificate: x509.Certificate, trust: TrustStore) -> str:
    """``CERTIFICATE_REVOKED`` when ``certificate`` or a CA above it (as the trust store
    holds them) is revoked, "" otherwise. Only revocation: the TLS layer has checked the
    chain to the CA and its validity, and a certificate without a Chapar identity (an
    operator's scraper, say) is admitted here as it was."""
    return "CERTIFICATE_REVOKED" if trust.chain_revoked(certificate) else ""


class SideServiceAdmission(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls of the side services by a certificate the trust store refuses."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust
        self._prefixes = tuple(f"/{name}/" for name in SIDE_SERVICES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        checked = {
            kind: self._checked(getattr(handler, kind))
            for kind in _KINDS
            if getattr(handler, kind) is not None
        }
        return handler._replace(**checked)

    def _checked(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        trust = self.trust

        async def admit(context: grpc.aio.ServicerContext) -> None:
            pems = context.auth_context().get("x509_pem_cert") or []
            try:
                reason = revocation(x509.load_pem_x509_certificate(pems[0]), trust) if pems else ""
            except ValueError:
                reason = "CERTIFICATE_MALFORMED"
            if reason:
                await abort(
                    context,
                    ChaparError(Code.UNAUTHENTICATED, reason, "client certificate refused"),
                )

        if inspect.isasyncgenfunction(behaviour):

            async def streamed(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await admit(context)
                async for response in behaviour(request, context):
                    yield response

            return streamed

        async def answered(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await behaviour(request, context)

        return answered
