"""`GET /health`: a plain HTTP route for container health checks and load balancers (Docker's HEALTHCHECK).

Answers 200 with a small JSON body once the page's server is up: `{"status": "ok", "sessions": N}`, or
`{"status": "degraded", "problems": {"storage": "..."}}` when chats are not being saved. No gradio
queue, no model call: it says the process serves requests, not that a reply would be quick. `python -m webui.health`
asks it from inside the container (exit status 0: healthy).
"""

from __future__ import annotations

HEALTH_PATH = "/health"
#: Parts of the app that may run degraded (name -> a function saying why, or None), e.g. the chat database: a
#: corrupted, read-only or deleted database keeps the chat working unsaved and /health answers "degraded".
PROBLEM_SOURCES: dict = {}


def report_problems(name: str, source) -> None:
    """Have /health ask `source()` (None: fine, else the reason) under `name` on every request."""
    PROBLEM_SOURCES[name] = source


def problems() -> dict[str, str]:
    found = {}
    for name, source in list(PROBLEM_SOURCES.items()):
        reason = source()
        if reason:
            found[name] = reason
    return found


def add_health_route(app, engine=None) -> None:
    """Add `GET /health` to gradio's FastAPI `app` (available once `Blocks.launch` has built it). Still 200 when
    degraded (the process serves chats; a restart would not fix a broken disk), with `status: "degraded"` and
    `problems` naming what does not work."""
    from fastapi.responses import JSONResponse

    def health() -> JSONResponse:
        found = problems()
        body = {"status": "degraded" if found else "ok"}
        if found:
            body["problems"] = found
        if engine is not None:
            body["sessions"] = len(engine.session_ids())
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    app.add_api_route(HEALTH_PATH, health, methods=["GET"], include_in_schema=False)


def check(port: int | None = None, timeout_s: float = 4.0) -> bool:
    """True when `GET /health` on this machine answers 200 (the container's HEALTHCHECK; port from `$PORT`)."""
    import os
    import urllib.request

    port = port or int(os.environ.get("PORT") or 7860)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":  # python -m webui.health: exit status 0 when healthy (Docker HEALTHCHECK)
    raise SystemExit(0 if check() else 1)
