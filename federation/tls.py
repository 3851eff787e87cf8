"""TLS for the hub itself and for everything that talks to a hub (members, mirrors, peers).

Certificates are always verified: a client trusts the system's certificate
authorities, or the one in ``ca`` (a PEM file) for a hub with a private CA.
A hub may also ask its callers for certificates (mutual TLS) from a CA it
names; the request signatures stay the authentication either way, TLS adds
confidentiality and, with client certificates, a second gate.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError


@dataclass(frozen=True)
class ClientTls:
    """How a client checks a hub's certificate, and the certificate it shows when asked."""

    ca: str | None = None
    """PEM file of the certificate authorities to trust instead of the system's."""
    client_cert: str | None = None
    """PEM file holding this client's certificate and private key, for hubs that require mutual TLS."""

    def context(self) -> ssl.SSLContext | None:
        """The SSL context for ``https://`` hubs; None means the default (system CAs, verified)."""
        if self.ca is None and self.client_cert is None:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.client_cert is not None:
                context.load_cert_chain(self.client_cert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the TLS files {self.ca or ''} {self.client_cert or ''}: {exc}"
            ) from exc
        return context


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The hub's TLS context: TLS 1.2 or later; with ``client_ca``, callers must show a certificate from it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use the hub's TLS files ({cert}, {key}, {client_ca or 'no client CA'}): {exc}"
        ) from exc
    return context


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--ca`` and ``--client-cert``, for ``https://`` hubs with a private CA or mutual TLS."""
    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=os.environ.get("HASHFED_CA"),
        help="PEM file of the CA that issued the hub's TLS certificate, when it is not a public one "
        "(default: $HASHFED_CA; certificates are always verified)",
    )
    parser.add_argument(
        "--client-cert",
        metavar="FILE",
        default=os.environ.get("HASHFED_CLIENT_CERT"),
        help="PEM file with your TLS client certificate and its key, for a hub that requires mutual TLS "
        "(default: $HASHFED_CLIENT_CERT)",
    )


def client_tls(args: argparse.Namespace) -> ClientTls:
    return ClientTls(getattr(args, "ca", None), getattr(args, "client_cert", None))
