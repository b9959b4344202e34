"""The login check for the app's plain HTTP APIs (OpenAI-compatible chat, Prometheus metrics).

The browser UI logs in through Gradio's form; programs cannot, so the same `--auth user:password` credentials are
accepted the ways HTTP clients send them: `Authorization: Bearer user:password` (what OpenAI clients send as
their API key) or HTTP Basic (what Prometheus and curl `-u` send). No credentials configured: open, as the UI.
"""

from __future__ import annotations

import base64
import binascii
import hmac


def credentials_ok(authorization: str | None, auth: tuple[str, str] | None) -> bool:
    """Whether an `Authorization` header value carries the app's `(user, password)`; always True without auth."""
    if auth is None:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    user, sep, password = value.partition(":")
    # Compare both parts in constant time, and both always, so timing tells nothing about which one was wrong.
    user_ok = hmac.compare_digest(user.encode("utf-8"), auth[0].encode("utf-8"))
    password_ok = hmac.compare_digest(password.encode("utf-8"), auth[1].encode("utf-8"))
    return bool(sep) and user_ok and password_ok
