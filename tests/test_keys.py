"""Signed-note keys (design §3): encodings built by hand, parse refusals, key files."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.keys import (
    KeyFormatError,
    SignerKey,
    VerifierKey,
    load_signer_file,
    split_key_id,
    write_signer_file,
)

names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
seeds = st.binary(min_size=32, max_size=32)


ZERO, ONE, TWO = b"\x00", b"\x01", b"\x02"


def public_of(seed: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hand_hash(name: str, public: bytes) -> str:
    """§3: first 4 bytes of SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public key), 8 lowercase hex digits."""
    return hashlib.sha256(name.encode() + b"\n" + b"\x01" + public).digest()[:4].hex()


# ---- known answers -----------------------------------------------------------


def test_known_answer_from_a_fixed_seed() -> None:
    seed = bytes(range(32))
    name = "example.org_hub-1"
    public = public_of(seed)
    key_hash = hand_hash(name, public)
    expected_verifier = f"{name}+{key_hash}+{b64(ONE + public)}"
    expected_signer = f"PRIVATE+KEY+{name}+{key_hash}+{b64(ONE + seed)}"

    signer = SignerKey(name, seed)
    assert signer.encode() == expected_signer
    assert signer.verifier.encode() == expected_verifier
    assert signer.key_id == signer.verifier.key_id == f"{name}+{key_hash}"
    assert signer.verifier.public == public
    assert signer.verifier.hash == bytes.fromhex(key_hash)
    assert SignerKey.parse(expected_signer) == signer
    assert VerifierKey.parse(expected_verifier) == signer.verifier
    # The material is 33 bytes: 44 base64 characters, no padding.
    assert len(expected_verifier.split("+", 2)[2]) == 44


# Published vectors of golang.org/x/mod/sumdb/note (note_test.go) and of
# transparency-dev/formats (a verifier key whose base64 contains '+').
GO_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_SIGNATURE = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
PLUS_VERIFIER = "TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6"


def test_go_sumdb_note_vectors() -> None:
    signer = SignerKey.parse(GO_SIGNER)
    assert signer.name == "PeterNeumann"
    assert signer.encode() == GO_SIGNER
    assert signer.verifier.encode() == GO_VERIFIER
    assert VerifierKey.parse(GO_VERIFIER) == signer.verifier
    # Ed25519 is deterministic: signing the published text gives the published signature.
    raw = base64.b64decode(GO_SIGNATURE)
    assert raw[:4] == signer.verifier.hash
    assert signer.sign(GO_TEXT) == raw[4:]
    assert signer.verifier.verify(GO_TEXT, raw[4:])
    assert not signer.verifier.verify(GO_TEXT.replace(b"you", b"You"), raw[4:])


def test_a_verifier_key_with_plus_in_its_base64() -> None:
    key = VerifierKey.parse(PLUS_VERIFIER)
    assert key.name == "TEST"
    assert key.key_id == "TEST+7997405c"
    assert key.encode() == PLUS_VERIFIER


def test_keys_whose_base64_contains_plus_parse() -> None:
    found = 0
    for counter in range(1000):
        seed = hashlib.sha256(b"plus %d" % counter).digest()
        signer = SignerKey("acme", seed)
        verifier_text = signer.verifier.encode()
        if "+" not in b64(b"\x01" + seed) or "+" not in b64(b"\x01" + signer.verifier.public):
            continue
        assert signer.encode().count("+") >= 5 and verifier_text.count("+") >= 3
        assert SignerKey.parse(signer.encode()) == signer
        assert VerifierKey.parse(verifier_text) == signer.verifier
        found += 1
        if found == 5:
            break
    assert found == 5


# ---- round trips ---------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(names, seeds)
def test_encode_parse_round_trip(name: str, seed: bytes) -> None:
    signer = SignerKey(name, seed)
    public = public_of(seed)
    assert signer.verifier.public == public
    assert signer.key_id == f"{name}+{hand_hash(name, public)}"
    assert split_key_id(signer.key_id) == (name, hand_hash(name, public))
    assert SignerKey.parse(signer.encode()) == signer
    assert VerifierKey.parse(signer.verifier.encode()) == signer.verifier
    assert VerifierKey.parse(signer.verifier.encode() + "\n") == signer.verifier
    message = name.encode() + seed
    assert signer.verifier.verify(message, signer.sign(message))


@settings(max_examples=30, deadline=None)
@given(names)
def test_keygen_round_trip(name: str) -> None:
    signer = SignerKey.generate(name)
    assert signer.name == name and len(signer.seed) == 32
    again = SignerKey.parse(signer.encode())
    assert again == signer
    verifier = VerifierKey.parse(signer.verifier.encode())
    assert verifier.verify(b"m", again.sign(b"m"))
    assert repr(signer) == f"SignerKey({signer.key_id!r})"
    assert b64(signer.seed) not in repr(signer)


def test_keygen_keys_differ_and_refuse_bad_names() -> None:
    assert SignerKey.generate("a").seed != SignerKey.generate("a").seed
    for bad in ["", "a b", "a+b", "x" * 65, "é", "a/b"]:
        with pytest.raises(KeyFormatError):
            SignerKey.generate(bad)


# ---- refusals -----------------------------------------------------------------

SEED = bytes(range(32))
PUBLIC = public_of(SEED)
NAME = "acme"
HASH = hand_hash(NAME, PUBLIC)
GOOD_VERIFIER = f"{NAME}+{HASH}+{b64(ONE + PUBLIC)}"
GOOD_SIGNER = f"PRIVATE+KEY+{NAME}+{HASH}+{b64(ONE + SEED)}"


def test_the_refusal_fixtures_are_themselves_valid() -> None:
    assert VerifierKey.parse(GOOD_VERIFIER).key_id == f"{NAME}+{HASH}"
    assert HASH.upper() != HASH  # so the upper-case refusal really changes the text
    assert SignerKey.parse(GOOD_SIGNER).verifier == VerifierKey.parse(GOOD_VERIFIER)


def bad_name_verifier(name: str) -> str:
    return f"{name}+{hand_hash(name, PUBLIC)}+{b64(ONE + PUBLIC)}"


def bad_name_signer(name: str) -> str:
    return f"PRIVATE+KEY+{name}+{hand_hash(name, PUBLIC)}+{b64(ONE + SEED)}"


WRONG_HASH = f"{int(HASH, 16) ^ 1:08x}"
BAD_VERIFIERS = {
    "empty name": bad_name_verifier(""),
    "space in name": bad_name_verifier("ac me"),
    "65-character name": bad_name_verifier("a" * 65),
    "non-ASCII name": bad_name_verifier("acmé"),
    "wrong hash": f"{NAME}+{WRONG_HASH}+{b64(ONE + PUBLIC)}",
    "upper-case hash": f"{NAME}+{HASH.upper()}+{b64(ONE + PUBLIC)}",
    "short hash": f"{NAME}+{HASH[:7]}+{b64(ONE + PUBLIC)}",
    "algorithm byte 0x02": f"{NAME}+{HASH}+{b64(TWO + PUBLIC)}",
    "algorithm byte 0x00": f"{NAME}+{HASH}+{b64(ZERO + PUBLIC)}",
    "no algorithm byte": f"{NAME}+{HASH}+{b64(PUBLIC)}",
    "one byte short": f"{NAME}+{HASH}+{b64(ONE + PUBLIC[:-1])}",
    "one byte long": f"{NAME}+{HASH}+{b64(ONE + PUBLIC + ZERO)}",
    "base64 with a bad character": f"{NAME}+{HASH}+{b64(ONE + PUBLIC)[:-1]}*",
    "base64 truncated": f"{NAME}+{HASH}+{b64(ONE + PUBLIC)[:-1]}",
    "url-safe base64": f"{NAME}+{HASH}+{b64(ONE + PUBLIC).replace('+', '-').replace('/', '_')}x",
    "base64 with inner space": f"{NAME}+{HASH}+{b64(ONE + PUBLIC)[:20]} {b64(ONE + PUBLIC)[20:]}",
    "missing material": f"{NAME}+{HASH}",
    "empty": "",
    "a signer key": GOOD_SIGNER,
}


@pytest.mark.parametrize("text", BAD_VERIFIERS.values(), ids=BAD_VERIFIERS.keys())
def test_verifier_parse_refusals(text: str) -> None:
    with pytest.raises(KeyFormatError):
        VerifierKey.parse(text)


BAD_SIGNERS = {
    "empty name": bad_name_signer(""),
    "space in name": bad_name_signer("ac me"),
    "65-character name": bad_name_signer("a" * 65),
    "wrong hash": f"PRIVATE+KEY+{NAME}+{WRONG_HASH}+{b64(ONE + SEED)}",
    "hash of another name": f"PRIVATE+KEY+{NAME}+{hand_hash('acmf', PUBLIC)}+{b64(ONE + SEED)}",
    "algorithm byte 0x02": f"PRIVATE+KEY+{NAME}+{HASH}+{b64(TWO + SEED)}",
    "one byte short": f"PRIVATE+KEY+{NAME}+{HASH}+{b64(ONE + SEED[:-1])}",
    "one byte long": f"PRIVATE+KEY+{NAME}+{HASH}+{b64(ONE + SEED + ZERO)}",
    "bad base64": f"PRIVATE+KEY+{NAME}+{HASH}+{b64(ONE + SEED)[:-1]}!",
    "lower-case prefix": f"private+key+{NAME}+{HASH}+{b64(ONE + SEED)}",
    "a verifier key": GOOD_VERIFIER,
    "prefix only": "PRIVATE+KEY+",
}


@pytest.mark.parametrize("text", BAD_SIGNERS.values(), ids=BAD_SIGNERS.keys())
def test_signer_parse_refusals(text: str) -> None:
    with pytest.raises(KeyFormatError):
        SignerKey.parse(text)


@pytest.mark.parametrize(
    "text", ["acme", "acme+", "acme+1234567", "acme+1234567G", "acme+ABCDEF01", "+12345678"]
)
def test_key_id_refusals(text: str) -> None:
    with pytest.raises(KeyFormatError):
        split_key_id(text)


# ---- key files ------------------------------------------------------------------


def test_write_signer_file_mode_0600_and_no_overwrite(tmp_path: Path) -> None:
    key = SignerKey.generate("acme")
    path = tmp_path / "sub" / "acme.key"
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        write_signer_file(key, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.encode() + "\n"
    assert load_signer_file(path) == key

    other = SignerKey.generate("acme")
    with pytest.raises(KeyFormatError, match="exists"):
        write_signer_file(other, path)
    assert load_signer_file(path) == key  # untouched
    write_signer_file(other, path, overwrite=True)
    assert load_signer_file(path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["acme.key"]  # no temporary left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602, 0o610])
def test_load_signer_file_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    key = SignerKey.generate("acme")
    path = tmp_path / "acme.key"
    write_signer_file(key, path)
    path.chmod(mode)
    with pytest.raises(KeyFormatError, match="chmod 600"):
        load_signer_file(path)
    path.chmod(0o600)
    assert load_signer_file(path) == key


def test_load_signer_file_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match="does not exist"):
        load_signer_file(tmp_path / "nope.key")
    path = tmp_path / "bad.key"
    path.write_text(GOOD_VERIFIER + "\n")
    path.chmod(0o600)
    with pytest.raises(KeyFormatError):
        load_signer_file(path)
