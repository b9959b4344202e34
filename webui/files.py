"""Files the app leaves on disk: history uploads and downloads, which gradio copies into its cache folder.

Before issue 28 they stayed forever, in world-readable folders (`/tmp/gradio`, mode 755), and a deleted
conversation's downloaded copies stayed too, though uploads need no login without `--auth`. Now:

* `private_cache_dir()` points gradio's cache (`GRADIO_TEMP_DIR`) at a folder only this user can enter (0700),
  unless the operator set one; called before the `gr.Blocks` is built, which reads it.
* `BLOCKS_DELETE_CACHE` is the `delete_cache` argument of `gr.Blocks`: gradio deletes cached files (uploads,
  downloads) older than `FILE_MAX_AGE_S`, checking every `FILE_SWEEP_S`.
* `remember_export(token, folder)` / `forget_exports(token)`: the download folders written for a conversation,
  removed when it is deleted (gradio's own copy is swept by age as above).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

#: Oldest a cached upload or download may get before gradio's sweep deletes it: long enough to finish a download.
FILE_MAX_AGE_S = 3600
#: How often gradio sweeps its cache for files older than `FILE_MAX_AGE_S`.
FILE_SWEEP_S = 600
#: `gr.Blocks(delete_cache=...)`: (how often, how old).
BLOCKS_DELETE_CACHE = (FILE_SWEEP_S, FILE_MAX_AGE_S)
#: Most conversations whose download folders are tracked (the oldest entries are dropped, their files aged out).
MAX_TRACKED_EXPORTS = 10_000

_lock = threading.Lock()
_exports: dict[str, list[Path]] = {}


def private_cache_dir() -> str:
    """Gradio's cache folder, created private (0700) when the app chooses it; an operator's `GRADIO_TEMP_DIR` is
    kept as given. Returns the folder."""
    chosen = os.environ.get("GRADIO_TEMP_DIR")
    if chosen:
        return chosen
    folder = Path(tempfile.gettempdir()) / f"streaming-llm-gradio-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)  # an existing folder from an older run may have been created world-readable
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return str(folder)


def export_folder() -> Path:
    """A fresh private folder (0700, as `mkdtemp` makes it) for one download."""
    return Path(tempfile.mkdtemp(prefix="streaming-llm-"))


def remember_export(token: str, folder: Path) -> None:
    with _lock:
        _exports.setdefault(token, []).append(folder)
        while len(_exports) > MAX_TRACKED_EXPORTS:
            del _exports[next(iter(_exports))]


def forget_exports(token: str) -> int:
    """Delete every download folder written for `token`; returns how many were removed."""
    with _lock:
        folders = _exports.pop(token, [])
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)
