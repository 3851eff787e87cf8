"""Checkpoints: C2SP tlog-checkpoint bodies in signed notes (design §6).

A note is its text (lines ending in newline), a blank line, and one or more
signature lines ``— <key name> <base64(4-byte key hash ‖ signature)>``. The
signature covers the text exactly; a verifier checks the line whose name and
key hash match its key and ignores the others (co-signers, witnesses).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .keys import SignerKey, VerifierKey

SIGNATURE_DASH = "\u2014"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_SIG_LINE = re.compile(rf"{SIGNATURE_DASH} (\S+) ([A-Za-z0-9+/=]+)")


class CheckpointError(ValueError):
    """A note or checkpoint that cannot be parsed or does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    """``<hub name>/<collection>``: names the log this checkpoint is for."""
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    def sign(self, *signers: SignerKey) -> str:
        """The signed note: one signature line per signer (two while a hub key rotation overlaps)."""
        body = self.text()
        lines = []
        for signer in signers:
            material = base64.b64encode(signer.verifier.hash + signer.sign(body.encode())).decode()
            lines.append(f"{SIGNATURE_DASH} {signer.name} {material}\n")
        return f"{body}\n{''.join(lines)}"

    @classmethod
    def parse_text(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise CheckpointError(
                "checkpoint text must have origin, size and root lines, each ending in newline"
            )
        origin, size_text, root_text = lines[0], lines[1], lines[2]
        if not origin:
            raise CheckpointError("checkpoint origin line is empty")
        if not _DECIMAL.fullmatch(size_text):
            raise CheckpointError(f"checkpoint size {size_text!r} is not a decimal number")
        try:
            root = base64.b64decode(root_text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CheckpointError("checkpoint root is not valid base64") from exc
        if len(root) != 32:
            raise CheckpointError("checkpoint root must be 32 bytes")
        return cls(origin, int(size_text), root)


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """Split a signed note into its text and its (name, key hash ‖ signature) lines."""
    text, separator, signature_block = note.rpartition("\n\n")
    if not separator or not signature_block.endswith("\n"):
        raise CheckpointError("a signed note is text, a blank line, then signature lines ending in newline")
    signatures = []
    for line in signature_block[:-1].split("\n"):
        match = _SIG_LINE.fullmatch(line)
        if not match:
            raise CheckpointError(f"malformed signature line {line!r}")
        try:
            raw = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CheckpointError("signature line is not valid base64") from exc
        if len(raw) < 5:
            raise CheckpointError("signature line is too short")
        signatures.append((match.group(1), raw))
    return text + "\n", signatures


def open_note(note: str, verifier: VerifierKey | Sequence[VerifierKey]) -> Checkpoint:
    """Verify a checkpoint note against a hub's key (or any one of several) and return the checkpoint."""
    verifiers = [verifier] if isinstance(verifier, VerifierKey) else list(verifier)
    text, signatures = split_note(note)
    for key in verifiers:
        for name, raw in signatures:
            if name == key.name and raw[:4] == key.hash:
                if not key.verify(text.encode(), raw[4:]):
                    raise CheckpointError(f"checkpoint signature by {key.key_id} does not verify")
                return Checkpoint.parse_text(text)
    names = " or ".join(key.key_id for key in verifiers)
    raise CheckpointError(f"checkpoint is not signed by {names}")
