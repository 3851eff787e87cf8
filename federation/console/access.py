"""Who may use the console: short-lived login tokens, sessions and CSRF tokens.

A browser cannot sign RFC 9421 requests, so the console has a login of its
own that never touches the API's authentication. ``hashfed console-token
DIR`` issues a random token valid for some hours and stores only its SHA-256
(in ``DIR/console-tokens.json``, owner-only). The login form exchanges a
valid token for a session: a random id in an HttpOnly, SameSite=Strict
cookie, kept until the token's expiry in the hub's memory, or, with several
workers, in the state they share (a restart logs everyone out). Every form
carries the session's CSRF token, random and kept with it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..durable import write_atomically

if TYPE_CHECKING:
    from ..hub.shared_guard import SharedState

TOKEN_FILE = "console-tokens.json"
COOKIE = "hashfed_console"
MAX_HOURS = 24 * 7


class TokenError(ConfigError):
    """A login token that is unknown, malformed or expired; the message says which."""


@dataclass
class Session:
    expires: float
    csrf: str


class ConsoleAccess:
    """Tokens on disk; sessions in memory, or in ``shared`` state when several workers serve the hub."""

    def __init__(self, token_file: Path, shared: SharedState | None = None) -> None:
        self.token_file = token_file
        self.shared = shared
        self._sessions: dict[str, Session] = {}

    # ---- tokens (hashfed console-token) -------------------------------------

    def _tokens(self) -> dict[str, float]:
        try:
            raw = json.loads(self.token_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise TokenError(
                f"{self.token_file} is damaged ({exc}); delete it and issue a new token"
            ) from exc
        return {str(digest): float(expiry) for digest, expiry in raw.items()}

    def issue(self, hours: float, now: float | None = None) -> tuple[str, float]:
        """A new token and its expiry (Unix time); expired tokens are dropped from the file."""
        if not 0 < hours <= MAX_HOURS:
            raise TokenError(f"a console token lasts from a moment to {MAX_HOURS} hours, not {hours}")
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        tokens = {digest: expiry for digest, expiry in self._tokens().items() if expiry > now}
        expiry = now + hours * 3600
        tokens[_digest(token)] = expiry
        write_atomically(self.token_file, json.dumps(tokens, indent=2) + "\n")
        return token, expiry

    # ---- sessions ------------------------------------------------------------

    def log_in(self, token: str) -> tuple[str, Session]:
        """A session for a valid token: (session id, session)."""
        expiry = self._tokens().get(_digest(token.strip()))
        if expiry is None:
            raise TokenError(
                "this token is not one this hub issued; make one with `hashfed console-token DIR`"
            )
        if expiry <= time.time():
            raise TokenError("this token has expired; make a new one with `hashfed console-token DIR`")
        session_id = secrets.token_urlsafe(32)
        session = Session(expiry, secrets.token_hex(32))
        if self.shared is None:
            self._sessions[session_id] = session
        else:
            with self.shared.transaction() as conn:
                conn.execute("DELETE FROM sessions WHERE expires <= ?", (time.time(),))
                conn.execute(
                    "INSERT INTO sessions (id, expires, csrf) VALUES (?, ?, ?)",
                    (session_id, expiry, session.csrf),
                )
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        if self.shared is None:
            session = self._sessions.get(session_id)
        else:
            with self.shared.transaction() as conn:
                row = conn.execute(
                    "SELECT expires, csrf FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
            session = None if row is None else Session(float(row[0]), str(row[1]))
        if session is None:
            return None
        if session.expires <= time.time():
            self.log_out(session_id)
            return None
        return session

    def log_out(self, session_id: str) -> None:
        if self.shared is None:
            self._sessions.pop(session_id, None)
            return
        with self.shared.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
