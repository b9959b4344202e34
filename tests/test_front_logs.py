"""The fronts of `deploy/` keep gradio's session hash out of their access logs (issue 28, item 9): the hash acts as
a page's login and gradio puts it in URLs (`?session_hash=` on the event streams, `/heartbeat/<hash>`,
`/stream/<hash>/...`). The app's own server logs no requests (gradio runs uvicorn at log level "warning"); the
fronts log every request, so they are where it leaked.

The replicas are two tiny standard-library HTTP servers (no model): what is checked is the front's log."""

from __future__ import annotations

import time
import urllib.request

from browser_util import stop_app
from fronts import FRONTS

#: A session hash as gradio's page makes one (random base-36), easy to spot in a log.
HASH = "zq9hash4test7x"
#: The URLs a page's gradio client requests with its hash in them.
LEAKY_PATHS = (f"/gradio_api/queue/data?session_hash={HASH}&fn_index=3", f"/gradio_api/heartbeat/{HASH}",
               f"/gradio_api/stream/{HASH}/run1/5/playlist.m3u8")
#: How long the front may take to write its log line (HAProxy writes to stdout, nginx to a file).
LOG_WAIT_S = 60


def logged(folder, marker: str) -> str:
    """Both fronts' logs once `marker` shows up in one of them (or after `LOG_WAIT_S`)."""
    files = [folder / "nginx" / "access.log", folder / "haproxy.log"]
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        text = "".join(path.read_text(errors="replace") for path in files if path.exists())
        if marker in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


@FRONTS
def test_the_fronts_log_requests_without_the_pages_session_hash(make_front, stub_replicas, tmp_path):
    process, port, _ = make_front(stub_replicas, tmp_path)
    try:
        for path in LEAKY_PATHS:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
                assert answer.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/last-request", timeout=30) as answer:
            assert answer.status == 200
        log = logged(tmp_path, "/last-request")
    finally:
        stop_app(process)
    assert "/last-request" in log  # the front does log requests
    assert HASH not in log
    assert "/gradio_api/queue/data" in log and "/gradio_api/heartbeat/-" in log  # the paths are kept, the hash not
    assert "/gradio_api/stream/-/run1/5/playlist.m3u8" in log
