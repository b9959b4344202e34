"""`deploy/compose.yaml` agrees with what it starts, checked without Docker (none runs where this project is
tested; `docker compose up` itself has not been run): the replicas it defines are the ones the nginx config it mounts
sends requests to, each replica's command is a valid `python app.py` command line whose database is the compose
file's PostgreSQL service with that service's credentials, the replicas start once the database is healthy, and the
image they are built from holds the code they run and the PostgreSQL driver `--database-url` needs.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fronts import AFFINITY_COOKIE, DEPLOY, SAMPLE_LISTEN_PORT
from test_dockerfile import DOCKERFILE, ROOT, instructions

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -r requirements-dev.txt)")

if sys.version_info >= (3, 11):
    import tomllib
else:  # 3.10: the same parser as the `tomli` package (pip and setuptools bring it)
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 without tomli: pip install tomli")

COMPOSE = DEPLOY / "compose.yaml"
#: Where the stock nginx image's nginx.conf includes site files from (inside its `http` block).
NGINX_SITE_DIR = "/etc/nginx/conf.d/"
#: PostgreSQL's port when a URL names none.
POSTGRES_DEFAULT_PORT = 5432


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def replicas(stack: dict) -> dict[str, dict]:
    """The app replicas: the services built from this repository."""
    found = {name: service for name, service in stack["services"].items() if "build" in service}
    assert found, "compose.yaml builds no app replica"
    return found


def postgres(stack: dict) -> tuple[str, dict]:
    """The one PostgreSQL service (by its image): its name and definition."""
    found = [(name, s) for name, s in stack["services"].items() if str(s.get("image", "")).startswith("postgres:")]
    assert len(found) == 1, "compose.yaml must have exactly one postgres service"
    return found[0]


def mounted_nginx_config(stack: dict) -> tuple[str, Path]:
    """The nginx service's name and the file of this repository it mounts as a site."""
    (name, service), = [(n, s) for n, s in stack["services"].items() if str(s.get("image", "")).startswith("nginx")]
    sites = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if target.startswith(NGINX_SITE_DIR) and target.endswith(".conf"):
            sites.append((COMPOSE.parent / source).resolve())
    assert len(sites) == 1, f"the nginx service must mount one site into {NGINX_SITE_DIR}*.conf, found {sites}"
    assert sites[0].is_file(), sites[0]
    return name, sites[0]


def image_env() -> dict[str, str]:
    """The environment the Dockerfile's ENV lines give the image (no `${...}` in those values)."""
    env = {}
    for keyword, args in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def replica_settings(service: dict):
    """The app's settings from the replica's command line and environment (the image's, then the service's), as
    `python app.py` parses them: an unknown flag or a bad value stops the test as it would stop the replica."""
    from webui.settings import parse_settings

    command = service["command"]
    assert command[:2] == ["python", "app.py"], command
    env = {**image_env(), **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
    return parse_settings(command[2:], env=env), env


def nginx_addresses(config: str) -> tuple[set[str], set[str]]:
    """The replica addresses the config's `upstream` lists, and those its affinity cookie's `map` pins to."""
    upstream = set()
    for body in re.findall(r"upstream\s+\w+\s*\{(.*?)\}", config, re.S):
        upstream |= set(re.findall(r"^\s*server\s+(\S+:\d+)", body, re.M))
    (pins,) = re.findall(rf"map\s+\$cookie_{AFFINITY_COOKIE}\s+\$\w+\s*\{{(.*?)\}}", config, re.S)
    pinned = set()
    for key, value in re.findall(r'^\s*"([^"]+)"\s+(\S+);', pins, re.M):
        assert key == value, f"the cookie {key} pins to another address, {value}"
        pinned.add(value)
    return upstream, pinned


def test_the_nginx_config_compose_mounts_sends_requests_to_exactly_its_replicas():
    stack = compose()
    nginx, site = mounted_nginx_config(stack)
    config = site.read_text()
    upstream, pinned = nginx_addresses(config)
    served = set()
    for name, service in replicas(stack).items():
        # The config names loopback addresses: a replica must share nginx's network namespace to be reached there.
        assert service.get("network_mode") == f"service:{nginx}", name
        settings, _ = replica_settings(service)
        assert settings.host == "127.0.0.1", f"{name} would be reachable around nginx"
        served.add(f"{settings.host}:{settings.port}")
    assert len(served) == len(replicas(stack)), "two replicas listen on one port"
    assert upstream == served, "the upstream and the replicas differ"
    assert pinned == served, "the affinity map and the replicas differ"
    listen = re.findall(r"^\s*listen\s+(\d+);", config, re.M)
    assert listen == [str(SAMPLE_LISTEN_PORT)]
    published = {str(p).rsplit(":", 1)[-1] for p in stack["services"][nginx].get("ports", [])}
    assert published == set(listen), "nginx publishes another port than it listens on"


def test_the_address_reader_sees_a_replica_missing_from_the_map():
    """The check above cannot pass by reading nothing: one address left out of the `map` is seen as missing."""
    config = (DEPLOY / "nginx.conf").read_text()
    upstream, pinned = nginx_addresses(config)
    assert len(upstream) == 2 and pinned == upstream
    last = sorted(pinned)[-1]
    _, fewer = nginx_addresses(re.sub(rf'^\s*"{re.escape(last)}".*\n', "", config, flags=re.M))
    assert fewer == pinned - {last}


def test_each_replica_runs_the_app_on_the_compose_postgres_with_its_credentials():
    stack = compose()
    db_name, db = postgres(stack)
    credentials = db["environment"]
    for name, service in replicas(stack).items():
        settings, env = replica_settings(service)
        assert settings.database_url, f"{name} has no --database-url: it would keep chats in its own SQLite file"
        url = urlsplit(settings.database_url)
        assert url.hostname == db_name, f"{name}'s database is not the {db_name} service"
        assert (url.port or POSTGRES_DEFAULT_PORT) == POSTGRES_DEFAULT_PORT
        assert url.username == credentials["POSTGRES_USER"] and url.password == credentials["POSTGRES_PASSWORD"]
        assert url.path == f"/{credentials['POSTGRES_DB']}"
        assert "--database-wait" in service["command"] and settings.database_wait_s > 0
        # The image's HEALTHCHECK (python -m webui.health) asks $PORT: it must be the port the app listens on.
        assert settings.port == int(env["PORT"]), name


def test_the_replicas_start_once_postgres_is_healthy():
    stack = compose()
    db_name, db = postgres(stack)
    check = db.get("healthcheck", {}).get("test")
    assert check and "pg_isready" in check, "the postgres service needs a readiness healthcheck"
    assert db["environment"]["POSTGRES_USER"] in check and db["environment"]["POSTGRES_DB"] in check
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in db.get("volumes", [])), \
        "the database lives in a volume, not in the container"
    for name, service in replicas(stack).items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict) and depends.get(db_name, {}).get("condition") == "service_healthy", name


def first_party_imports(path: Path) -> set[str]:
    """The top-level modules and packages of this repository that `path` imports (anywhere in its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names
                  if (ROOT / f"{n.split('.')[0]}.py").is_file() or (ROOT / n.split(".")[0] / "__init__.py").is_file()}
    return found


def test_the_image_copies_everything_the_app_imports_and_its_assets():
    from webui.assets import ASSETS

    stack = compose()
    for name, service in replicas(stack).items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == DOCKERFILE.name, name
    copied = set()
    for keyword, args in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "COPY":
            *sources, dest = shlex.split(args)
            # Each lands under its own name in the working folder, where app.py looks for its packages and assets.
            assert dest in ("./", f"./{sources[0]}") and (dest == "./" or len(sources) == 1), args
            copied |= set(sources)
    needed, todo = {"app"}, [ROOT / "app.py"]
    while todo:
        path = todo.pop()
        for top in first_party_imports(path) - needed:
            needed.add(top)
            todo += [ROOT / f"{top}.py"] if (ROOT / f"{top}.py").is_file() else sorted((ROOT / top).rglob("*.py"))
    assert {"streaming_engine", "webui"} <= needed  # the walk found the packages app.py imports
    needed = {f"{n}.py" if (ROOT / f"{n}.py").is_file() else n for n in needed}
    needed.add(ASSETS.relative_to(ROOT).parts[0])
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"


def test_the_image_installs_the_postgres_driver_that_database_url_needs():
    """`--database-url` needs psycopg, which requirements.txt leaves out (a Space has no PostgreSQL): the image
    installs it with the `postgres` extra's own requirement."""
    (wanted,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["postgres"]
    installs = [shlex.split(step) for keyword, step in instructions(DOCKERFILE.read_text(encoding="utf-8"))
                if keyword == "RUN"]
    assert any(wanted in words for words in installs), f"no RUN step installs {wanted!r}"
