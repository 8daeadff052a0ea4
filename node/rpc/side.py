"""The side services of a server's port (gRPC health checking and server reflection) admit
what the trust store admits, as the roles' own services do.

The TLS layer admits any certificate that chains to ``[tls] ca``; it knows nothing of the
directory's revocations. The hub's and node's servicers check every caller with the trust
store (``peer_certificate``), but health and reflection are grpc's own servicers: a revoked
certificate (or one under a revoked CA) was still served by them. This interceptor refuses
it: UNAUTHENTICATED / ``CERTIFICATE_REVOKED``, and ends with that status the streams (a
health ``Watch``, a reflection stream) of a certificate revoked after they opened, as the
letter streams and document transfers end: the trust store, which every directory change
goes through (``set_revoked``), tells it. Any other certificate of the CA is served, as
before (an operator's or a load balancer's, with or without a Chapar identity): the state of
an agency in the directory is not asked, as a suspended agency's node may still read the
directory to learn its state. ``/metrics`` with ``metrics_tls`` applies the same
``revocation`` (node.server).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from client_sdk.trust import TrustStore
from node.core.errors import ChaparError, Code
from node.rpc.errors import abort
from node.tasks import unless_set

__all__ = ["SIDE_SERVICES", "SideServiceAdmission", "revocation"]

SIDE_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
log = logging.getLogger(__name__)


def revocation(certificate: x509.Certificate, trust: TrustStore) -> str:
    """``CERTIFICATE_REVOKED`` when ``certificate`` or a CA above it (as the trust store
    holds them) is revoked, "" otherwise. Only revocation: the TLS layer has checked the
    chain to the CA and its validity, and a certificate without a Chapar identity (an
    operator's scraper, say) is admitted here as it was."""
    return "CERTIFICATE_REVOKED" if trust.chain_revoked(certificate) else ""


class SideServiceAdmission(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls of the side services by a certificate the trust store refuses, and
    ends their streams (a health ``Watch``, a reflection stream) opened before the trust
    store revoked it, as the letter streams and transfers are ended: the trust store
    calls ``end_revoked`` whenever its revocations change."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust
        self._prefixes = tuple(f"/{name}/" for name in SIDE_SERVICES)
        # The streams running, each with the certificate it was admitted with; set when
        # a revocation ends it.
        self._streams: dict[asyncio.Event, x509.Certificate] = {}
        trust.revocation_listeners.append(self.end_revoked)

    def end_revoked(self) -> None:
        for ended, certificate in self._streams.items():
            if not ended.is_set() and self.trust.chain_revoked(certificate):
                ended.set()

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
            kind: self._streamed(getattr(handler, kind), method)
            if kind.endswith("_stream")
            else self._answered(getattr(handler, kind))
            for kind in _KINDS
            if getattr(handler, kind) is not None
        }
        return handler._replace(**checked)

    def _admitted(self, context: grpc.aio.ServicerContext) -> x509.Certificate | ChaparError | None:
        """The caller's certificate (None without one: the ports require one), or why it
        is refused."""
        pems = context.auth_context().get("x509_pem_cert") or []
        try:
            certificate = x509.load_pem_x509_certificate(pems[0]) if pems else None
        except ValueError:
            return _refused("CERTIFICATE_MALFORMED")
        if certificate is not None and (reason := revocation(certificate, self.trust)):
            return _refused(reason)
        return certificate

    def _answered(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def answered(request: Any, context: grpc.aio.ServicerContext) -> Any:
            admitted = self._admitted(context)
            if isinstance(admitted, ChaparError):
                await abort(context, admitted)
            return await behaviour(request, context)

        return answered

    def _streamed(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        """A streaming answer, run until it ends or a revocation ends it. Always a
        coroutine writing with ``context.write`` (grpc.aio takes either form), so that a
        generator and a writer (health ``Watch``) are cancelled alike wherever they wait."""

        async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
            if inspect.isasyncgenfunction(behaviour):
                async for response in behaviour(request, context):
                    await context.write(response)
            else:
                await behaviour(request, context)

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> None:
            admitted = self._admitted(context)
            if isinstance(admitted, ChaparError):
                await abort(context, admitted)
                return
            if admitted is None:
                await written(request, context)
                return
            ended = asyncio.Event()
            self._streams[ended] = admitted  # no await since the check: none missed
            try:
                if await unless_set(written(request, context), ended):
                    return
            finally:
                del self._streams[ended]
            log.warning("ending a stream of %s: CERTIFICATE_REVOKED", method)
            await abort(context, _refused("CERTIFICATE_REVOKED"))

        return streamed


def _refused(reason: str) -> ChaparError:
    return ChaparError(Code.UNAUTHENTICATED, reason, "client certificate refused")
