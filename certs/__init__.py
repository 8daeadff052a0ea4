"""Chapar PKI tooling: the development CA and the certificates of hubs, agencies and auditors.

The package owns the certificate profiles and file layout (``certs.pki``) and the
``chapar pki`` command (``certs.cli``). Identities and chain verification live in
``client_sdk.identity`` and ``client_sdk.trust``; this package only produces certificates
that pass them.
"""

from __future__ import annotations

from certs.pki import PkiError, PkiLayout, init_pki

__all__ = ["PkiError", "PkiLayout", "init_pki"]
