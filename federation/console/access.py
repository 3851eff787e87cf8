"""Who may use the console: short-lived login tokens, sessions and CSRF tokens.

A browser cannot sign RFC 9421 requests, so the console has a login of its
own that never touches the API's authentication. ``hashfed console-token
DIR`` issues a random token valid for some hours and stores only its SHA-256
(in ``DIR/console-tokens.json``, owner-only). The login form exchanges a
valid token for a session: a random id in an HttpOnly, SameSite=Strict
cookie, kept in the hub's memory until the token's expiry (a restart logs
everyone out). Every form carries a CSRF token, an HMAC of the session id
under a per-process secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..durable import write_atomically

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
    """Tokens on disk, sessions in memory."""

    def __init__(self, token_file: Path) -> None:
        self.token_file = token_file
        self._sessions: dict[str, Session] = {}
        self._secret = secrets.token_bytes(32)

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
        csrf = hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()
        session = self._sessions[session_id] = Session(expiry, csrf)
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= time.time():
            del self._sessions[session_id]
            return None
        return session

    def log_out(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
