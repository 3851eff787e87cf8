"""TLS on the hub itself, with a throwaway certificate authority made by the test.

The real ``hashfed serve`` serves HTTPS from hub.toml's ``tls_cert`` / ``tls_key``; the real
``hashfed submit``, ``lookup`` and ``mirror`` verify its certificate (refusing it without the CA),
a peer hub follows it over HTTPS, and with ``tls_client_ca`` callers must show a client certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.admin import change_membership
from federation.config import PeerConfig
from federation.durable import write_atomically
from federation.envelope import Grant
from federation.keys import SignerKey, write_signer_file
from tests.conftest import Federation
from tests.faults import free_port, hashfed, start_hashfed, wait_exit, wait_until_ready
from tests.helpers import pdq
from tests.sync_helpers import READ, make_hub


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client: Path
    """Client certificate and key in one PEM file."""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA, a certificate for 127.0.0.1 and a client certificate, valid for a day."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("hashfed test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    made = Pki(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "client.pem")
    made.ca.write_bytes(_pem(ca))
    made.server_cert.write_bytes(_pem(_issue("127.0.0.1", server_key, (ca, ca_key), server=True)))
    write_atomically(made.server_key, _key_pem(server_key))
    write_atomically(
        made.client, _pem(_issue("acme", client_key, (ca, ca_key), client=True)) + _key_pem(client_key)
    )
    return made


@pytest.fixture
def https_hub(federation: Federation, pki: Pki, tmp_path: Path) -> Iterator[str]:
    """``hashfed serve`` over HTTPS with the test CA's certificate; yields its URL."""
    yield from _serve(federation, pki, tmp_path, client_ca=False)


def _serve(federation: Federation, pki: Pki, tmp_path: Path, *, client_ca: bool) -> Iterator[str]:
    config = dataclasses.replace(
        federation.data.config(),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca) if client_ca else "",
    )
    write_atomically(federation.data.config_file, config.to_toml())
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_hashfed("serve", str(federation.data.path), "--port", str(port), log=log)
    url = f"https://127.0.0.1:{port}"
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client)
        asyncio.run(wait_until_ready(url, proc, log, context))
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        wait_exit(proc, 60)
    assert f"serving on {url}" in log.read_text()


def _key_file(federation: Federation, tmp_path: Path, member: str = "acme") -> Path:
    path = tmp_path / f"{member}.key"
    if not path.exists():
        write_signer_file(federation.members[member], path)
    return path


def _hashes(tmp_path: Path) -> Path:
    path = tmp_path / "hashes.txt"
    path.write_text(pdq(1) + "\n" + pdq(2) + "\n")
    return path


def test_members_verify_the_hubs_certificate(
    https_hub: str, federation: Federation, pki: Pki, tmp_path: Path
) -> None:
    key, hashes_file = _key_file(federation, tmp_path), _hashes(tmp_path)
    base = ("--hub", https_hub, "--key", str(key))
    refused = hashfed("submit", *base, "--collection", "main", "--type", "pdq", str(hashes_file))
    assert refused.returncode == 1
    assert (
        "TLS certificate" in refused.stderr
        and "did not verify" in refused.stderr
        and "--ca" in refused.stderr
    )

    done = hashfed(
        "submit", *base, "--ca", str(pki.ca), "--collection", "main", "--type", "pdq", str(hashes_file)
    )
    assert done.returncode == 0, done.stderr
    found = hashfed("lookup", *base, "--ca", str(pki.ca), "--type", "pdq", "--json", pdq(1))
    assert found.returncode == 0, found.stderr
    assert pdq(1) in found.stdout

    mirror = tmp_path / "mirror"
    pin = federation.data.verifier_file.read_text().strip()
    made = hashfed("mirror", *base, "--ca", str(pki.ca), "--collection", "main", "--pin", pin, str(mirror))
    assert made.returncode == 0, made.stderr
    again = hashfed("mirror", str(mirror))  # the CA is kept in mirror.toml
    assert again.returncode == 0, again.stderr
    assert f'ca = "{pki.ca}"' in (mirror / "mirror.toml").read_text()


def test_mutual_tls_requires_a_client_certificate(federation: Federation, pki: Pki, tmp_path: Path) -> None:
    for url in _serve(federation, pki, tmp_path, client_ca=True):
        base = ("--hub", url, "--key", str(_key_file(federation, tmp_path)), "--ca", str(pki.ca))
        without = hashfed("lookup", *base, "--type", "pdq", pdq(1))
        assert without.returncode == 1
        assert "cannot reach the hub" in without.stderr
        with_cert = hashfed("lookup", *base, "--client-cert", str(pki.client), "--type", "pdq", pdq(1))
        assert with_cert.returncode == 0, with_cert.stderr


async def test_a_peer_hub_follows_over_https(
    https_hub: str, federation: Federation, pki: Pki, tmp_path: Path
) -> None:
    follower = make_hub(tmp_path / "peers", "hub-b", {"reader": READ})
    member = SignerKey.generate("hub-b-peer")
    change_membership(federation.data, "main", grant=[Grant(member.verifier, frozenset({"read"}))])
    key_path = tmp_path / "hub-b-peer.key"
    write_signer_file(member, key_path)
    submitted = await asyncio.to_thread(
        hashfed,
        "submit",
        "--hub",
        https_hub,
        "--key",
        str(_key_file(federation, tmp_path)),
        "--ca",
        str(pki.ca),
        "--collection",
        "main",
        "--type",
        "pdq",
        str(_hashes(tmp_path)),
    )
    assert submitted.returncode == 0, submitted.stderr
    hub_key = federation.data.verifier_file.read_text().strip()
    peer = PeerConfig(
        url=https_hub,
        key=hub_key,
        member_key=str(key_path),
        collections=("main",),
        interval=0.05,
        timeout=5.0,
        ca=str(pki.ca),
    )
    await follower.serve([peer])
    try:
        for _ in range(300):
            sources = await follower.get("/v1/sources")
            if any(item.get("checkpoint") for item in sources["sources"]):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the peer never verified a checkpoint over HTTPS: {sources}")
        answers = await follower.lookup("reader", [pdq(1)])
        assert [match["hash"] for match in answers[0]] == [pdq(1)]
    finally:
        await follower.stop()
