"""Registering servicers so that requests arrive as bytes and are parsed here.

gRPC's own deserializer answers a malformed message with a bare INTERNAL status and an
oversized one with RESOURCE_EXHAUSTED without any reason. Parsing ourselves gives every
such request a canonical code with an ErrorInfo reason (MALFORMED_MESSAGE,
MESSAGE_TOO_LARGE), counted in the metrics, and the server carries on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from node.core.errors import ChaparError, Code
from node.rpc.errors import abort, unexpected

__all__ = ["add_servicer", "parse", "serialize"]

Context: TypeAlias = grpc.aio.ServicerContext


def parse(cls: type[Message], raw: bytes, limit: int) -> Any:
    """``cls`` parsed from ``raw``; ChaparError when too large or not a valid message."""
    if len(raw) > limit:
        raise ChaparError(
            Code.RESOURCE_EXHAUSTED,
            "MESSAGE_TOO_LARGE",
            f"message of {len(raw)} bytes is over the limit of {limit}",
            metadata={"limit": str(limit), "size": str(len(raw))},
        )
    try:
        return cls.FromString(raw)
    except (DecodeError, UnicodeDecodeError) as exc:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "MALFORMED_MESSAGE",
            f"not a valid {cls.DESCRIPTOR.full_name}",
            metadata={"type": cls.DESCRIPTOR.full_name},
        ) from exc


async def _parsed(raw: AsyncIterator[bytes], cls: type[Message], limit: int) -> AsyncIterator[Any]:
    async for item in raw:
        yield parse(cls, item, limit)


def serialize(message: Message | bytes) -> bytes:
    """A message serialised; bytes are taken as one already (see ``node.core.splice``)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, *, limit: int
) -> None:
    """Registers every method of ``service`` implemented by ``servicer`` with raw requests.

    Stream handlers get an iterator that raises ChaparError on a bad frame; they end the
    stream with that error (the hub's Connect and the node's StreamSubmitEnvelopes do).
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        cls = message_factory.GetMessageClass(method.input_type)
        handler: Callable[[Any, Context], Awaitable[Any]]
        if method.client_streaming:
            handler = _stream_in(impl, cls, limit)
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
        else:
            handler = _unary_in(impl, cls, limit)
            make = (
                grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
        handlers[method.name] = make(
            _guarded(handler, f"{service.name}.{method.name}"),
            request_deserializer=None,
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _guarded(
    handler: Callable[[Any, Context], Awaitable[Any]], method: str
) -> Callable[[Any, Context], Awaitable[Any]]:
    """``handler``, with whatever it did not expect answered as a status with a reason.

    A ChaparError it let through ends the call with its status, as ``abort`` would; any
    other exception (its database failing, a defect) becomes ``unexpected``'s status, logged
    with its traceback under an incident id, instead of gRPC's UNKNOWN carrying the Python
    exception's text. One ``try`` a call: a stream pays it once.
    """

    async def guarded(request: Any, context: Context) -> Any:
        try:
            return await handler(request, context)
        except grpc.aio.AbortError:  # the handler ended the call with its own status
            raise
        except ChaparError as exc:
            error = exc
        except Exception as exc:
            error = unexpected(exc, method)
        if context.done():  # the call ended meanwhile (its caller went): no one to tell
            return None
        await abort(context, error)
        raise AssertionError("unreachable")

    return guarded


def _unary_in(
    impl: Callable[[Any, Context], Awaitable[Any]], cls: type[Message], limit: int
) -> Callable[[bytes, Context], Awaitable[Any]]:
    async def handler(raw: bytes, context: Context) -> Any:
        return await impl(parse(cls, raw, limit), context)  # its ChaparError: _guarded

    return handler


def _stream_in(
    impl: Callable[[AsyncIterator[Any], Context], Awaitable[Any]], cls: type[Message], limit: int
) -> Callable[[AsyncIterator[bytes], Context], Awaitable[Any]]:
    async def handler(raw: AsyncIterator[bytes], context: Context) -> Any:
        return await impl(_parsed(raw, cls, limit), context)

    return handler
