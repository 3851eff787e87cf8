"""Checkpoints as C2SP signed notes (design §6), checked against a hand-built note."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.checkpoint import Checkpoint, CheckpointError, open_note, split_note
from federation.keys import SignerKey, VerifierKey

DASH = "\u2014"  # EM DASH
SEED = bytes(range(32))
HUB = SignerKey("testhub", SEED)
ROOT = hashlib.sha256(b"some root").digest()
CHECKPOINT = Checkpoint("testhub/main", 1234, ROOT)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hand_key_hash(name: str, seed: bytes) -> bytes:
    public = (
        Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]


def hand_signature_line(name: str, seed: bytes, text: str) -> str:
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(text.encode())
    return f"{DASH} {name} {b64(hand_key_hash(name, seed) + signature)}\n"


def hand_note(text: str, name: str = "testhub", seed: bytes = SEED) -> str:
    return text + "\n" + hand_signature_line(name, seed, text)


def test_note_text_is_exactly_the_c2sp_format() -> None:
    text = f"testhub/main\n1234\n{b64(ROOT)}\n"
    assert CHECKPOINT.text() == text
    # Ed25519 is deterministic, so the whole note can be built independently.
    assert CHECKPOINT.sign(HUB) == hand_note(text)
    lines = CHECKPOINT.sign(HUB).split("\n")
    assert lines[3] == ""
    assert lines[4].startswith("\u2014 testhub ")
    assert lines[5] == ""


def test_signature_verifies_independently() -> None:
    note = CHECKPOINT.sign(HUB)
    body, _, signature_line = note.partition("\n\n")
    dash, name, material = signature_line.rstrip("\n").split(" ")
    assert (dash, name) == (DASH, "testhub")
    raw = base64.b64decode(material, validate=True)
    assert len(raw) == 4 + 64
    assert raw[:4] == hand_key_hash("testhub", SEED)
    public = Ed25519PublicKey.from_public_bytes(HUB.verifier.public)
    public.verify(raw[4:], (body + "\n").encode())  # raises if it does not verify


@settings(max_examples=50, deadline=None)
@given(
    origin=st.from_regex(r"[A-Za-z0-9._-]{1,20}/[A-Za-z0-9._-]{1,20}", fullmatch=True),
    size=st.integers(0, 2**63),
    root=st.binary(min_size=32, max_size=32),
)
def test_sign_open_round_trip(origin: str, size: int, root: bytes) -> None:
    checkpoint = Checkpoint(origin, size, root)
    note = checkpoint.sign(HUB)
    assert open_note(note, HUB.verifier) == checkpoint
    assert Checkpoint.parse_text(checkpoint.text()) == checkpoint


# ---- tampering -------------------------------------------------------------------


def test_tampered_text_is_refused() -> None:
    note = CHECKPOINT.sign(HUB)
    other_root = b64(hashlib.sha256(b"another root").digest())
    tampered = {
        "root": note.replace(b64(ROOT), other_root),
        "size": note.replace("\n1234\n", "\n1235\n"),
        "size shrunk": note.replace("\n1234\n", "\n123\n"),
        "origin": note.replace("testhub/main", "testhub/mai2"),
        "origin prefix": "x" + note,
        "extension line": note.replace("\n\n", "\nextra\n\n", 1),
    }
    for what, text in tampered.items():
        assert text != note, what
        with pytest.raises(CheckpointError):
            open_note(text, HUB.verifier)


def test_every_flipped_signature_or_key_hash_byte_is_refused() -> None:
    note = CHECKPOINT.sign(HUB)
    prefix, material = note.rstrip("\n").rsplit(" ", 1)
    raw = base64.b64decode(material)
    for position in range(len(raw)):
        bad = bytearray(raw)
        bad[position] ^= 1 << (position % 8)
        with pytest.raises(CheckpointError):
            open_note(f"{prefix} {b64(bytes(bad))}\n", HUB.verifier)
    # Truncated signature material
    with pytest.raises(CheckpointError):
        open_note(f"{prefix} {b64(raw[:-1])}\n", HUB.verifier)


def test_signature_by_another_key_is_refused() -> None:
    impostor = SignerKey("testhub", bytes(range(1, 33)))  # same name, other key
    stranger = SignerKey("otherhub", bytes(range(2, 34)))
    for signer in (impostor, stranger):
        with pytest.raises(CheckpointError):
            open_note(CHECKPOINT.sign(signer), HUB.verifier)
    # An impostor that claims the hub's key hash.
    text = CHECKPOINT.text()
    forged_signature = impostor.sign(text.encode())
    forged = f"{text}\n{DASH} testhub {b64(HUB.verifier.hash + forged_signature)}\n"
    with pytest.raises(CheckpointError):
        open_note(forged, HUB.verifier)


def test_co_signatures_from_other_keys_are_ignored() -> None:
    text = CHECKPOINT.text()
    witness_a = hand_signature_line("witness.example", bytes(range(5, 37)), text)
    witness_b = hand_signature_line("testhub-mirror", bytes(range(9, 41)), text)
    ours = hand_signature_line("testhub", SEED, text)
    for lines in ([witness_a, ours], [ours, witness_b], [witness_a, ours, witness_b]):
        assert open_note(text + "\n" + "".join(lines), HUB.verifier) == CHECKPOINT
    with pytest.raises(CheckpointError, match="not signed by"):
        open_note(text + "\n" + witness_a + witness_b, HUB.verifier)


def test_go_sumdb_note_vector_splits_and_verifies() -> None:
    verifier = VerifierKey.parse("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
    text = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
    signature = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
    got_text, signatures = split_note(f"{text}\n{DASH} PeterNeumann {signature}\n")
    assert got_text == text
    assert [(name, raw[:4]) for name, raw in signatures] == [("PeterNeumann", verifier.hash)]
    assert verifier.verify(text.encode(), signatures[0][1][4:])
    # Not a checkpoint body, though: open_note verifies, then refuses to parse it.
    with pytest.raises(CheckpointError):
        open_note(f"{text}\n{DASH} PeterNeumann {signature}\n", verifier)


# ---- malformed notes and bodies ----------------------------------------------------

MALFORMED_NOTES = {
    "no signature block": CHECKPOINT.text(),
    "no trailing newline": CHECKPOINT.sign(HUB)[:-1],
    "ASCII hyphen": CHECKPOINT.sign(HUB).replace(DASH, "-"),
    "en dash": CHECKPOINT.sign(HUB).replace(DASH, "\u2013"),
    "two spaces": CHECKPOINT.sign(HUB).replace(f"{DASH} ", f"{DASH}  "),
    "blank signature line": CHECKPOINT.sign(HUB) + "\n",
    "signature not base64": CHECKPOINT.sign(HUB).replace("\n\u2014 testhub ", "\n\u2014 testhub !"),
    "empty": "",
}


@pytest.mark.parametrize("note", MALFORMED_NOTES.values(), ids=MALFORMED_NOTES.keys())
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(CheckpointError):
        open_note(note, HUB.verifier)


BAD_BODIES = {
    "leading zero": f"testhub/main\n01234\n{b64(ROOT)}\n",
    "negative size": f"testhub/main\n-1\n{b64(ROOT)}\n",
    "plus sign": f"testhub/main\n+5\n{b64(ROOT)}\n",
    "space in size": f"testhub/main\n 5\n{b64(ROOT)}\n",
    "hex size": f"testhub/main\n0x10\n{b64(ROOT)}\n",
    "Arabic-Indic digits": f"testhub/main\n\u0665\n{b64(ROOT)}\n",
    "fullwidth digits": f"testhub/main\n\uff11\uff12\n{b64(ROOT)}\n",
    "superscript digit": f"testhub/main\n\u00b2\n{b64(ROOT)}\n",
    "31-byte root": f"testhub/main\n5\n{b64(ROOT[:31])}\n",
    "33-byte root": f"testhub/main\n5\n{b64(ROOT + b'x')}\n",
    "root not base64": f"testhub/main\n5\n{b64(ROOT)[:-1]}*\n",
    "url-safe root": f"testhub/main\n5\n{b64(ROOT).replace('+', '-').replace('/', '_')}x\n",
    "empty origin": f"\n5\n{b64(ROOT)}\n",
    "missing root": "testhub/main\n5\n",
}


@pytest.mark.parametrize("text", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_checkpoint_bodies_are_refused_even_when_signed(text: str) -> None:
    """The size must be ASCII decimal (C2SP tlog-checkpoint); only CheckpointError comes out."""
    with pytest.raises(CheckpointError):
        Checkpoint.parse_text(text)
    with pytest.raises(CheckpointError):
        open_note(hand_note(text), HUB.verifier)
