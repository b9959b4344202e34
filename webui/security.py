"""Security headers on every HTTP response the app's server sends: an ASGI middleware for gradio's FastAPI app.

* `X-Content-Type-Options: nosniff` — a browser never guesses a served file's type (an uploaded or generated file
  cannot turn into a script or a page);
* `Content-Security-Policy: frame-ancestors …` — which pages may show the app in a frame (clickjacking); it is
  configurable (`--frame-ancestors`) because a Hugging Face Space is shown inside huggingface.co's page. Only
  `frame-ancestors` is set: gradio's page needs inline scripts and styles, which a full policy would forbid;
* `Referrer-Policy: same-origin` — links the model writes never tell other sites which page they came from.

A plain ASGI middleware (not starlette's `BaseHTTPMiddleware`): it only touches the `http.response.start`
message, so streamed responses (gradio's server-sent events) pass through unbuffered. A header the response
already sets is left alone. Gradio adds middleware given in `app_kwargs={"middleware": …}` to its app, so this
covers every route, API and static files included (see `app.launch`).
"""

from __future__ import annotations

from starlette.middleware import Middleware


def security_headers(frame_ancestors: str) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs added to every response, as ASGI wants them (lower-case latin-1 bytes)."""
    return [
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", f"frame-ancestors {frame_ancestors}".encode("latin-1")),
        (b"referrer-policy", b"same-origin"),
    ]


class SecurityHeadersMiddleware:
    """Adds `security_headers(frame_ancestors)` to each HTTP response that does not set them itself."""

    def __init__(self, app, frame_ancestors: str):
        self.app = app
        self.headers = security_headers(frame_ancestors)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.headers if name not in present]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def middleware(frame_ancestors: str) -> Middleware:
    """The middleware entry for `launch(app_kwargs={"middleware": [...]})`."""
    return Middleware(SecurityHeadersMiddleware, frame_ancestors=frame_ancestors)
