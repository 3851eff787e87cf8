"""The worked examples of docs/protocol.md, produced by the real code.

Every example uses fixed keys (seeds ``bytes(range(...))``), fixed times and
fixed nonces, so the output is the same on every run. The HTTP responses come
from the real hub application, served on loopback from a temporary data
directory; only the request signatures made for those live calls use the
current time, and they are not shown.

    python docs/examples.py            print every example
    python docs/examples.py --write    rewrite the example blocks in docs/protocol.md
    python docs/examples.py --check    exit 1 if docs/protocol.md differs from the code

In docs/protocol.md an example is a line ``<!-- example: NAME -->`` followed
by a fenced code block; tests/test_docs_examples.py checks each block against
:func:`generate`.
"""

# ruff: noqa: E402  (the federation imports follow the sys.path set-up for script use)

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from federation import merkle
from federation.checkpoint import Checkpoint, open_note, split_note
from federation.config import DataDir, HubConfig
from federation.envelope import (
    BATCH_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Addition,
    Envelope,
    Grant,
    Header,
    OpinionItem,
    batch_payload,
    membership_payload,
    opinion_payload,
    pae,
    sign_envelope,
)
from federation.httpsig import sign_request, verify_request
from federation.hub import create_app, open_node
from federation.keys import SignerKey, write_signer_file
from federation.store.sqlite import SqliteStore

PROTOCOL_MD = ROOT / "docs" / "protocol.md"
EXAMPLE_BLOCK = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```[a-z]*\n(.*?)```\n", re.S)

HUB_NAME = "example-hub"
FEDERATION = "example"
COLLECTION = "csam-hashes"
HOST = "hub.example.org"

ACME = SignerKey("acme", bytes(range(32)))
BETA = SignerKey("beta", bytes(range(32, 64)))
HUB = SignerKey(HUB_NAME, bytes(range(64, 96)))

CREATED = "2026-11-21T19:00:00Z"
CREATED_UNIX = 1795287600
"""CREATED as Unix seconds."""

BRIDGE = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"
"""The PDQ hash of a public test image of a bridge."""
NEAR_BRIDGE = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b2d"
"""BRIDGE with its last four bits flipped (Hamming distance 4)."""
FAR = "0" * 64
TEST_MD5 = hashlib.md5(b"hashfed example file\n").hexdigest()

POST_CREATED = CREATED_UNIX + 5
POST_NONCE = "Vd1Jv2m9cW3H0xQk6tLr8A"
GET_CREATED = CREATED_UNIX + 9
GET_NONCE = "pK4sX0bN7eQ2yT5uZ8wR1g"


def _header(seq_offset: int) -> Header:
    """A payload header at CREATED; seq is microseconds since the epoch, like the client's."""
    return Header(FEDERATION, COLLECTION, CREATED_UNIX * 1_000_000 + seq_offset, CREATED)


def membership_envelope() -> Envelope:
    grants = [
        Grant(ACME.verifier, frozenset({"read", "write"})),
        Grant(BETA.verifier, frozenset({"read"})),
    ]
    return sign_envelope(HUB, MEMBERSHIP_TYPE, membership_payload(_header(0), grants))


def batch_envelope() -> Envelope:
    additions = [
        Addition("pdq", BRIDGE, ("test-image",), 100),
        Addition("md5", TEST_MD5, ("test-file",)),
    ]
    return sign_envelope(ACME, BATCH_TYPE, batch_payload(_header(1), "acme", additions))


def opinion_envelope() -> Envelope:
    opinion = OpinionItem("pdq", BRIDGE, "negative", "a public photo of a bridge")
    return sign_envelope(BETA, OPINION_TYPE, opinion_payload(_header(2), "beta", [opinion]))


def stale_envelope() -> Envelope:
    """A second batch from acme that reuses the seq of the first one."""
    additions = [Addition("pdq", FAR, ("test-image",))]
    return sign_envelope(ACME, BATCH_TYPE, batch_payload(_header(1), "acme", additions))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


# ---- examples that need no hub ---------------------------------------------


def key_examples() -> dict[str, str]:
    public = ACME.verifier.public
    hashed = ACME.name.encode() + b"\n" + b"\x01" + public
    lines = [
        f"seed (hex)             {ACME.seed.hex()}",
        f"public key (hex)       {public.hex()}",
        f"key hash input (hex)   {hashed.hex()}",
        "                       (name 'acme' ‖ 0x0a ‖ 0x01 ‖ public key)",
        f"SHA-256 of that        {hashlib.sha256(hashed).hexdigest()}",
        f"key hash               {ACME.verifier.hash.hex()}",
        f"key id                 {ACME.key_id}",
        f"verifier key           {ACME.verifier.encode()}",
        f"signer key             {ACME.encode()}",
    ]
    others = [
        f"hub key ({HUB.name}, seed bytes(range(64, 96)))",
        f"  key id               {HUB.key_id}",
        f"  verifier key         {HUB.verifier.encode()}",
        "beta (seed bytes(range(32, 64)))",
        f"  key id               {BETA.key_id}",
        f"  verifier key         {BETA.verifier.encode()}",
    ]
    return {"key-acme": "\n".join(lines) + "\n", "key-others": "\n".join(others) + "\n"}


def envelope_examples() -> dict[str, str]:
    batch = batch_envelope()
    membership = membership_envelope()
    opinion = opinion_envelope()
    leaf = merkle.leaf_hash(batch.canonical())
    assert batch.verify(ACME.verifier)
    return {
        "batch-payload-pretty": _pretty(json.loads(batch.payload)),
        "batch-payload": batch.payload.decode() + "\n",
        "batch-payload-base64": _b64(batch.payload) + "\n",
        "batch-pae": pae(batch.payload_type, batch.payload).decode() + "\n",
        "batch-signature": _b64(batch.signatures[0].sig) + "\n",
        "batch-envelope": batch.canonical().decode() + "\n",
        "batch-leaf-hash": f"base64  {_b64(leaf)}\nhex     {leaf.hex()}\n",
        "membership-payload-pretty": _pretty(json.loads(membership.payload)),
        "opinion-payload-pretty": _pretty(json.loads(opinion.payload)),
    }


def log_examples() -> dict[str, str]:
    entries = [membership_envelope(), batch_envelope(), opinion_envelope()]
    leaves = [merkle.leaf_hash(e.canonical()) for e in entries]
    left = merkle.node_hash(leaves[0], leaves[1])
    root = merkle.node_hash(left, leaves[2])
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    assert frontier.root() == root
    tree = [
        f"leaf 0 (membership)   {_b64(leaves[0])}",
        f"leaf 1 (batch)        {_b64(leaves[1])}",
        f"leaf 2 (opinion)      {_b64(leaves[2])}",
        f"node (1,0) = SHA-256(0x01 ‖ leaf 0 ‖ leaf 1)   {_b64(left)}",
        f"root of size 3 = SHA-256(0x01 ‖ node (1,0) ‖ leaf 2)   {_b64(root)}",
        f"root of the empty log = SHA-256()   {_b64(merkle.EMPTY_ROOT)}",
    ]
    checkpoint = Checkpoint(f"{HUB_NAME}/{COLLECTION}", 3, root)
    note = checkpoint.sign(HUB)
    assert open_note(note, HUB.verifier) == checkpoint
    _, signatures = split_note(note)
    (name, raw) = signatures[0]
    parts = [
        f"signed text (hex)   {checkpoint.text().encode().hex()}",
        f"signature line      name {name}, then base64 of {len(raw)} bytes:",
        f"  key hash          {raw[:4].hex()}",
        f"  Ed25519 signature {raw[4:].hex()}",
    ]
    return {
        "tree": "\n".join(tree) + "\n",
        "checkpoint": note,
        "checkpoint-parts": "\n".join(parts) + "\n",
    }


def _signed_request_text(method: str, target: str, headers: dict[str, str], body: bytes | None) -> str:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    if body:
        lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    text = "\n".join(lines) + "\n"
    if body:
        text += "\n" + body.decode() + "\n"
    return text


def _signature_base(method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> str:
    """Recover the signature base that ``sign_request`` signed, and check the signature."""
    signed_base: list[bytes] = []

    class Recording:
        def __init__(self, key: Any) -> None:
            self.key = key

        def verify(self, message: bytes, signature: bytes) -> bool:
            signed_base.append(message)
            return bool(self.key.verify(message, signature))

    verified = verify_request(
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        resolve_key=lambda key_id: Recording(ACME.verifier) if key_id == ACME.key_id else None,  # type: ignore[arg-type,return-value]
        now=int(headers["Signature-Input"].split("created=")[1].split(";")[0]),
    )
    assert verified.key_id == ACME.key_id
    return signed_base[0].decode() + "\n"


def http_signature_examples() -> dict[str, str]:
    path = f"/v1/collections/{COLLECTION}/entries"
    body = batch_envelope().canonical()
    post = sign_request(ACME, "POST", path, "", body, created=POST_CREATED, nonce=POST_NONCE)
    query = "start=0&limit=2"
    get = sign_request(ACME, "GET", path, query, None, created=GET_CREATED, nonce=GET_NONCE)
    return {
        "httpsig-post-base": _signature_base("POST", path, "", post, body),
        "httpsig-post-request": _signed_request_text("POST", path, post, body),
        "httpsig-get-base": _signature_base("GET", path, query, get, b""),
        "httpsig-get-request": _signed_request_text("GET", f"{path}?{query}", get, None),
    }


# ---- examples from a running hub --------------------------------------------


def _prepare_data_dir(path: Path) -> DataDir:
    data = DataDir(path)
    path.mkdir(parents=True, exist_ok=True)
    write_signer_file(HUB, data.signer_file)
    data.verifier_file.write_text(HUB.verifier.encode() + "\n")
    data.config_file.write_text(HubConfig(name=HUB_NAME, federation=FEDERATION).to_toml())
    store = SqliteStore(data.database)
    store.create_collection(COLLECTION)
    store.close()
    return data


_REASONS = {200: "OK", 201: "Created", 401: "Unauthorized", 404: "Not Found", 409: "Conflict"}


async def _call(
    session: aiohttp.ClientSession,
    base: URL,
    method: str,
    target: str,
    *,
    signer: SignerKey | None = None,
    body: bytes | None = None,
    accept: str = "application/json",
) -> tuple[int, str, str]:
    """Make one request; return (status, content type, body text)."""
    path, _, query = target.partition("?")
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if signer is not None:
        headers.update(sign_request(signer, method, path, query, body))
    url = URL(str(base) + target.lstrip("/"), encoded=True)
    async with session.request(method, url, data=body, headers=headers) as response:
        return response.status, response.content_type, await response.text()


def _response(status: int, content_type: str, text: str) -> str:
    head = f"HTTP/1.1 {status} {_REASONS[status]}\nContent-Type: {content_type}\n\n"
    if content_type.endswith("json") and not content_type.endswith("ndjson"):
        return head + _pretty(json.loads(text))
    return head + text


def _request(method: str, target: str, body: Any = None, signer: SignerKey | None = None) -> str:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    if signer is not None:
        lines.append(
            f"(signed by {signer.key_id}: Signature-Input, Signature{', Content-Digest' if body is not None else ''})"
        )
    text = "\n".join(lines) + "\n"
    if body is not None:
        text += "\n" + (_pretty(body) if not isinstance(body, str) else body + "\n")
    return text


async def _hub_examples(data: DataDir) -> dict[str, str]:
    out: dict[str, str] = {}
    node = open_node(data)
    server = TestServer(create_app(node, data.config()), host="127.0.0.1")
    await server.start_server()
    try:
        base = server.make_url("/")
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # up to 30 s for the start-up index load
                status, _, _ = await _call(session, base, "GET", "/v1/ready")
                if status == 200:
                    break
                await asyncio.sleep(0.05)

            async def call(method: str, target: str, **kwargs: Any) -> str:
                return _response(*await _call(session, base, method, target, **kwargs))

            entries = f"/v1/collections/{COLLECTION}/entries"
            out["http-health"] = await call("GET", "/v1/health")
            out["http-ready"] = await call("GET", "/v1/ready")
            out["http-hub"] = await call("GET", "/v1/hub")
            out["http-post-membership"] = await call(
                "POST", entries, signer=HUB, body=membership_envelope().canonical()
            )
            out["http-post-created"] = await call(
                "POST", entries, signer=ACME, body=batch_envelope().canonical()
            )
            out["http-post-repeat"] = await call(
                "POST", entries, signer=ACME, body=batch_envelope().canonical()
            )
            await call("POST", entries, signer=BETA, body=opinion_envelope().canonical())
            out["problem-stale-seq"] = await call(
                "POST", entries, signer=ACME, body=stale_envelope().canonical()
            )
            out["problem-unsigned"] = await call("GET", f"{entries}?start=0")
            out["problem-unknown-collection"] = await call(
                "GET", "/v1/collections/no-such-collection/checkpoint"
            )
            out["http-entries-request"] = _request("GET", f"{entries}?start=1&limit=1", signer=BETA)
            out["http-entries"] = await call("GET", f"{entries}?start=1&limit=1", signer=BETA)
            out["http-entries-ndjson"] = await call(
                "GET", f"{entries}?start=1", signer=BETA, accept="application/x-ndjson"
            )
            out["http-checkpoint"] = await call("GET", f"/v1/collections/{COLLECTION}/checkpoint")
            out["http-inclusion"] = await call(
                "GET", f"/v1/collections/{COLLECTION}/proof/inclusion?index=1&size=3", signer=BETA
            )
            out["http-consistency"] = await call(
                "GET", f"/v1/collections/{COLLECTION}/proof/consistency?old=2&new=3", signer=BETA
            )
            lookup = {
                "queries": [
                    {"type": "pdq", "hash": NEAR_BRIDGE},
                    {"type": "md5", "hash": TEST_MD5},
                    {"type": "pdq", "hash": FAR},
                ],
                "max_distance": 31,
            }
            out["http-lookup-request"] = _request("POST", "/v1/lookup", lookup, signer=BETA)
            body = json.dumps(lookup, separators=(",", ":")).encode()
            out["http-lookup"] = await call("POST", "/v1/lookup", signer=BETA, body=body)
    finally:
        await server.close()
    return out


def hub_examples() -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="hashfed-examples-") as tmp:
        data = _prepare_data_dir(Path(tmp) / "hub")
        return asyncio.run(_hub_examples(data))


# ---- all of them, and docs/protocol.md ---------------------------------------


def generate() -> dict[str, str]:
    """Every example by name; each value is the exact text of its code block."""
    examples: dict[str, str] = {}
    for part in (key_examples, envelope_examples, log_examples, http_signature_examples, hub_examples):
        examples.update(part())
    return examples


def embedded(markdown: str) -> dict[str, str]:
    """The example blocks of a markdown text, by name."""
    found: dict[str, str] = {}
    for match in EXAMPLE_BLOCK.finditer(markdown):
        name = match.group(1)
        if name in found:
            raise ValueError(f"example {name} appears twice")
        found[name] = match.group(2)
    return found


def rewrite(markdown: str, examples: dict[str, str]) -> str:
    """The markdown text with every example block replaced by its generated text."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in examples:
            raise KeyError(f"docs name an example {name!r} that the generator does not make")
        fence = match.group(0).split("\n", 2)[1]
        return f"<!-- example: {name} -->\n{fence}\n{examples[name]}```\n"

    return EXAMPLE_BLOCK.sub(replace, markdown)


def main(argv: list[str]) -> int:
    examples = generate()
    if "--write" in argv or "--check" in argv:
        current = PROTOCOL_MD.read_text()
        updated = rewrite(current, examples)
        missing = sorted(set(examples) - set(embedded(current)))
        if "--write" in argv:
            PROTOCOL_MD.write_text(updated)
        elif updated != current or missing:
            print(f"{PROTOCOL_MD} differs from the code; run python docs/examples.py --write")
            return 1
        if missing:
            print(f"examples not used in {PROTOCOL_MD.name}: {', '.join(missing)}")
        return 0
    for name, text in examples.items():
        print(f"<!-- example: {name} -->\n```\n{text}```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
