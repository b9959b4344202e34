"""`deploy/kubernetes.yaml` agrees with the app it runs and with itself, checked without a cluster (none runs where
this project is tested; `kubectl apply` itself has not been run): the app container's command is a valid
`python app.py` command line whose database is the manifest's PostgreSQL Service with the credentials its
PostgreSQL gets, every probe asks the app's health path on the port the app listens on, each Service reaches its
pods, the public Service keeps a client on one replica by the client's own address, and the database keeps its
data on a volume.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_deploy_files import image_env
from test_dockerfile import DOCKERFILE

from webui.health import HEALTH_PATH

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -r requirements-dev.txt)")

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes.yaml"
POSTGRES_DATA = "/var/lib/postgresql/data"


def manifest() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(docs: list[dict], spec: dict) -> dict[str, str]:
    """A container's environment with each `secretKeyRef` read from the manifest's Secret: a reference to a
    Secret or key that is not there fails here, as the pod would fail to start."""
    env = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        data = one(docs, "Secret", ref["name"])["stringData"]
        assert ref["key"] in data, f"{item['name']}: the Secret {ref['name']} has no key {ref['key']}"
        env[item["name"]] = str(data[ref["key"]])
    return env


def port_number(spec: dict, port) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p.get("name") == port]
    return number


def app_settings(docs: list[dict]):
    """The app's settings as `python app.py` parses its container's command line in its environment (the image's,
    then the container's): an unknown flag or a bad value stops the test as it would stop the replica."""
    from webui.settings import parse_settings

    spec = container(one(docs, "Deployment"), "app")
    assert spec["command"][:2] == ["python", "app.py"], spec["command"]
    env = {**image_env(), **env_of(docs, spec)}
    return parse_settings(spec["command"][2:], env=env), spec


def served_by(docs: list[dict], service: dict) -> dict:
    """The one workload whose pods a Service's selector picks."""
    selector = service["spec"]["selector"]
    picked = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(picked) == 1, f"the Service {service['metadata']['name']} selects {len(picked)} workloads"
    workload = picked[0]
    assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"][
        "labels"].items(), "a workload's selector must match its own pods"
    return workload


def check_public_service(docs: list[dict]) -> None:
    settings, spec = app_settings(docs)
    service = one(docs, "Service", "streaming-llm")
    assert served_by(docs, service)["metadata"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert port_number(spec, port["targetPort"]) == settings.port
    assert service["spec"].get("sessionAffinity") == "ClientIP", "a client would hop between replicas' caches"
    # Without it the cluster rewrites a visitor's address to a node's: every visitor is one client to the
    # per-client caps, and ClientIP affinity pins them all to one replica.
    assert service["spec"].get("externalTrafficPolicy") == "Local"


def test_the_app_runs_on_the_manifests_postgres_with_the_credentials_it_gets():
    docs = manifest()
    settings, spec = app_settings(docs)
    assert settings.database_url, "no --database-url: each replica would keep its chats in its own SQLite file"
    assert settings.database_wait_s > 0, "a replica started before the database would refuse to start"
    url = urlsplit(settings.database_url)
    db_service = one(docs, "Service", url.hostname)
    database = served_by(docs, db_service)
    postgres = container(database, "postgres")
    assert postgres["image"].startswith("postgres:")
    (port,) = db_service["spec"]["ports"]
    assert url.port == port["port"] and port_number(postgres, port["targetPort"]) == 5432
    credentials = env_of(docs, postgres)
    assert (url.username, url.password) == (credentials["POSTGRES_USER"], credentials["POSTGRES_PASSWORD"])
    assert url.path == f"/{credentials['POSTGRES_DB']}"


def test_every_probe_asks_the_health_path_on_the_port_the_app_listens_on():
    docs = manifest()
    settings, spec = app_settings(docs)
    assert settings.host == "0.0.0.0", "the Service could not reach an app that listens on loopback only"
    (declared,) = spec["ports"]
    assert declared["containerPort"] == settings.port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = spec[kind]["httpGet"]
        assert probe["path"] == HEALTH_PATH and port_number(spec, probe["port"]) == settings.port, kind
    # The server answers only once the model is loaded: the startup probe allows minutes, not the default 30 s.
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_public_service_reaches_the_replicas_and_keeps_each_client_on_one_by_its_own_address():
    docs = manifest()
    assert one(docs, "Deployment")["spec"]["replicas"] >= 2
    check_public_service(docs)


@pytest.mark.parametrize("broken", ["no affinity", "node addresses", "wrong port", "selects nothing"])
def test_the_service_check_sees_each_way_the_public_service_can_be_wrong(broken):
    """The check above cannot pass by reading nothing: each of these edits to the manifest fails it."""
    docs = copy.deepcopy(manifest())
    spec = one(docs, "Service", "streaming-llm")["spec"]
    if broken == "no affinity":
        del spec["sessionAffinity"]
    elif broken == "node addresses":
        spec["externalTrafficPolicy"] = "Cluster"
    elif broken == "wrong port":
        spec["ports"][0]["targetPort"] = 8080
    else:
        spec["selector"] = {"app.kubernetes.io/name": "nothing"}
    with pytest.raises(AssertionError):
        check_public_service(docs)


def test_postgres_keeps_its_data_on_a_volume_and_says_when_it_is_ready():
    docs = manifest()
    database = one(docs, "StatefulSet")
    postgres = container(database, "postgres")
    env = env_of(docs, postgres)
    (mount,) = [m for m in postgres["volumeMounts"] if m["mountPath"] == POSTGRES_DATA]
    claims = {c["metadata"]["name"] for c in database["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims, "the database would live in the container and go with it"
    # initdb wants an empty directory, and a fresh volume's root holds lost+found.
    assert env["PGDATA"].startswith(POSTGRES_DATA + "/")
    # The probe reads the user and database from the environment the Secret gives the container.
    shell, flag, check = postgres["readinessProbe"]["exec"]["command"]
    assert (shell, flag) == ("sh", "-c") and check.startswith("pg_isready ")
    assert shlex.split(check)[1:] == ["-U", "$POSTGRES_USER", "-d", "$POSTGRES_DB"]
    assert {"POSTGRES_USER", "POSTGRES_DB"} <= env.keys()
    assert database["spec"]["replicas"] == 1, "two PostgreSQL pods on one volume claim template are two databases"


def test_the_pods_run_as_the_images_own_user():
    (uid,) = re.findall(r"useradd\b.*?--uid (\d+)", DOCKERFILE.read_text(encoding="utf-8"))
    context = one(manifest(), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] == int(uid)
