"""Chapar client SDK: what an agency back-end needs to exchange letters through its node.

``ExchangeClient`` (async) and ``SyncExchangeClient`` (blocking) talk to the node's
``NodeService``; failures are ``ChaparError`` subclasses; ``Tracking.verify`` and
``Letter.verify`` check signatures and evidence offline against the root CA; attachments
travel as addresses (``send(..., attachments=[Path(...)])``, ``letter.attachments[0].save``). The generated
messages are ``client_sdk.pb``; signing and verification primitives are in
``client_sdk.signing`` and ``client_sdk.trust``.
"""

from client_sdk import pb as pb
from client_sdk.client import Attachment as Attachment
from client_sdk.client import Correspondence as Correspondence
from client_sdk.client import Draft as Draft
from client_sdk.client import ExchangeClient as ExchangeClient
from client_sdk.client import Letter as Letter
from client_sdk.client import Receipt as Receipt
from client_sdk.client import StatusUpdate as StatusUpdate
from client_sdk.client import Tracking as Tracking
from client_sdk.client import TreeLetter as TreeLetter
from client_sdk.client import VerifiedEvidence as VerifiedEvidence
from client_sdk.client import save_bundle as save_bundle
from client_sdk.credentials import Credentials as Credentials
from client_sdk.errors import AlreadyExists as AlreadyExists
from client_sdk.errors import Cancelled as Cancelled
from client_sdk.errors import ChaparError as ChaparError
from client_sdk.errors import DataLoss as DataLoss
from client_sdk.errors import DeadlineExceeded as DeadlineExceeded
from client_sdk.errors import FailedPrecondition as FailedPrecondition
from client_sdk.errors import InternalError as InternalError
from client_sdk.errors import InvalidArgument as InvalidArgument
from client_sdk.errors import NotFound as NotFound
from client_sdk.errors import OutOfRange as OutOfRange
from client_sdk.errors import PermissionDenied as PermissionDenied
from client_sdk.errors import ResourceExhausted as ResourceExhausted
from client_sdk.errors import Unauthenticated as Unauthenticated
from client_sdk.errors import Unavailable as Unavailable
from client_sdk.shams import format_shams as format_shams
from client_sdk.shams import format_shams_checked as format_shams_checked
from client_sdk.shams import parse_shams as parse_shams
from client_sdk.shams import parse_shams_typed as parse_shams_typed
from client_sdk.sync import SyncExchangeClient as SyncExchangeClient

__all__ = [
    "AlreadyExists",
    "Attachment",
    "Cancelled",
    "ChaparError",
    "Correspondence",
    "Credentials",
    "DataLoss",
    "DeadlineExceeded",
    "Draft",
    "ExchangeClient",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "Letter",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Receipt",
    "ResourceExhausted",
    "StatusUpdate",
    "SyncExchangeClient",
    "Tracking",
    "TreeLetter",
    "Unauthenticated",
    "Unavailable",
    "VerifiedEvidence",
    "format_shams",
    "format_shams_checked",
    "parse_shams",
    "parse_shams_typed",
    "save_bundle",
]
