"""The files users copy from ``sidecar/``, ``docker/`` and ``docs/``, checked with what runs here.

The sidecar's config, unit and program run the real ``cm-sidecar --print-config`` with the flags
they name (the settings model refuses unknown keys and bad values). Docker and Kubernetes cannot
run on these machines: the Dockerfile is linted structurally, and the compose and Kubernetes
files are parsed with PyYAML when it is installed (it is not a project dependency).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from clustermap.server.clusters import load_clusters
from clustermap.sidecar.config import SidecarSettings
from tests.support.procs import ROOT
from tests.support.stack import BIN

SIDECAR = ROOT / "sidecar"
DOCKER = ROOT / "docker"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
INSTALLED_CONFIG = "/etc/clustermap/sidecar.toml"  # where the unit and program expect it


def print_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cm-sidecar ARGS --print-config`` in an environment without CLUSTERMAP_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERMAP_")}
    out = subprocess.run(
        [str(BIN / "cm-sidecar"), *args, "--print-config"],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def ini(path: Path) -> configparser.ConfigParser:
    # Repeated keys are legal in systemd and uWSGI files; no %-interpolation anywhere.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep the keys' case (ExecStart)
    parser.read_string(path.read_text())
    return parser


def check_sidecar_command(command: str) -> list[str]:
    """``command`` runs an installed console script with flags cm-sidecar accepts."""
    argv = shlex.split(command)
    assert argv[0].startswith("/"), f"{argv[0]}: supervisors want an absolute path"
    assert PurePosixPath(argv[0]).name == "cm-sidecar"
    assert "cm-sidecar" in SCRIPTS
    args = [str(SIDECAR / "sidecar.toml") if a == INSTALLED_CONFIG else a for a in argv[1:]]
    assert str(SIDECAR / "sidecar.toml") in args, "the command should use the config file"
    print_config(*args)
    return argv


def test_sidecar_toml_is_valid_and_covers_every_setting() -> None:
    path = SIDECAR / "sidecar.toml"
    text = path.read_text()
    effective = print_config("--config", str(path))
    for key, value in tomllib.loads(text).items():
        assert effective[key] == value, key  # every key is a real setting, taken as written
    for name in SidecarSettings.model_fields:
        assert re.search(rf"^#? ?{name} = ", text, re.M), f"{name} is not in {path.name}"


def test_systemd_unit_starts_the_sidecar_with_valid_flags(tmp_path: Path) -> None:
    path = SIDECAR / "cm-sidecar.service"
    unit = ini(path)
    service = unit["Service"]
    argv = check_sidecar_command(service["ExecStart"])
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"  # graceful: snapshot written, exit 0
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    assert service["User"] not in ("", "root")
    # Each of these would hide or delete the region the workers read.
    for key in ("DynamicUser", "RemoveIPC", "PrivateDevices"):
        assert service.get(key, "no") == "no", key
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    verify = shutil.which("systemd-analyze")
    if verify:  # the real parser, with ExecStart pointing at this checkout's console script
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(argv[0], str(BIN / "cm-sidecar")))
        out = subprocess.run(
            [verify, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert path.name not in out.stderr, out.stderr


def test_supervisord_program_starts_the_sidecar_with_valid_flags() -> None:
    program = ini(SIDECAR / "supervisord.conf")["program:cm-sidecar"]
    check_sidecar_command(program["command"])
    assert program["stopsignal"] == "TERM"
    assert program["autorestart"] == "true"
    assert program["stopasgroup"] == program["killasgroup"] == "true"
    assert program["user"] not in ("", "root")
    assert int(program["stopwaitsecs"]) >= 10  # room for the last poll and the snapshot


def test_uwsgi_snippet_is_the_attach_line_the_e2e_test_runs() -> None:
    snippet = ini(SIDECAR / "uwsgi-attach.ini")["uwsgi"]
    tested = ini(ROOT / "client" / "uwsgi.ini")["uwsgi"]
    assert snippet["attach-daemon2"] == tested["attach-daemon2"]
    assert "cmd=exec cm-sidecar" in snippet["attach-daemon2"]
    assert snippet["env"] == tested["env"]


# -- docker/ ---------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"base": FROM argument, "user": last USER, "entry": ENTRYPOINT, ...}."""
    result: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    for instruction, args in dockerfile():
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m is not None
            assert m.group(2), f"unnamed stage: FROM {args}"
            current = {"base": m.group(1), "user": None, "copies": [], "runs": []}
            result[m.group(2).lower()] = current
        elif instruction == "USER":
            current["user"] = args
        elif instruction in ("ENTRYPOINT", "CMD"):
            current[instruction.lower()] = json.loads(args)
        elif instruction == "COPY":
            current["copies"].append(args.split())
        elif instruction == "RUN":
            current["runs"].append(args)
    return result


def effective_user(all_stages: dict[str, dict[str, Any]], name: str) -> str | None:
    stage = all_stages[name]
    if stage["user"] is not None:
        return str(stage["user"])
    base = stage["base"].lower()
    return effective_user(all_stages, base) if base in all_stages else None


def test_dockerfile_is_multi_stage_non_root_and_copies_real_files() -> None:
    instructions = dockerfile()
    assert not [a for i, a in instructions if i == "ADD"], "use COPY (ADD fetches URLs, unpacks)"
    all_stages = stages()
    assert {"build", "server", "sidecar", "app"} <= set(all_stages)
    # Each image users run: an unprivileged user, and the command of a real console script.
    for target in ("server", "sidecar", "app"):
        user = effective_user(all_stages, target)
        assert user is not None, target
        assert user.split(":")[0] not in ("0", "root"), (target, user)
    for target, command in (("server", "cm-server"), ("sidecar", "cm-sidecar")):
        assert all_stages[target]["entrypoint"] == [command]
        assert command in SCRIPTS
    assert all_stages["app"]["cmd"][:2] == ["gunicorn", "-c"]
    # The runtime images carry no build tools: the venv is copied from a build stage.
    assert any(c[0] == "--from=build" for c in all_stages["runtime"]["copies"])
    assert "uv" not in " ".join(all_stages["runtime"]["runs"])
    # Every COPY from the build context names a file of the repository, and the
    # Dockerfile-specific ignore file lets it through.
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in all_stages.values():
        for copy in stage["copies"]:
            if copy[0].startswith("--from"):
                continue
            sources = [s for s in copy[:-1] if not s.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"
    # The app image's gunicorn is the version the project's lock file tests.
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    gunicorn = next(p["version"] for p in lock["package"] if p["name"] == "gunicorn")
    assert f'"gunicorn=={gunicorn}"' in " ".join(all_stages["build-app"]["runs"])


def test_compose_and_kubernetes_size_the_shared_tmpfs() -> None:
    """Without a YAML parser: the settings that matter most are spelled out."""
    compose = (DOCKER / "compose.yaml").read_text()
    assert re.search(r"type: tmpfs", compose)
    size = re.search(r"size=(\d+)m", compose)
    assert size is not None
    assert int(size.group(1)) >= 2 * 36, "no room for a region replacement"
    kube = (DOCKER / "kubernetes.yaml").read_text()
    assert re.search(r"medium: Memory\s+sizeLimit: (\d+)Mi", kube)
    # The demo clusters file is valid for cm-server.
    assert [c.name for c in load_clusters(DOCKER / "clusters.toml")] == ["user-svc"]


def test_compose_file_structure() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "sidecar", "app"}
    targets = set(stages())
    for name, svc in services.items():
        build = svc["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        assert build["target"] in targets, name
    (volume, opts), *_ = (
        (k, v["driver_opts"]) for k, v in compose["volumes"].items() if v and "driver_opts" in v
    )
    assert opts["type"] == "tmpfs"
    assert re.search(r"(^|,)size=\d+[mg]", opts["o"]), opts
    region = services["sidecar"]["environment"]["CLUSTERMAP_REGION"]
    mounts = {
        name: next(m for m in svc.get("volumes", []) if m.startswith(volume + ":"))
        for name, svc in services.items()
        if name != "server"
    }
    for name, mount in mounts.items():
        assert services[name]["environment"]["CLUSTERMAP_REGION"] == region
        assert mount.split(":")[1] == str(PurePosixPath(region).parent), mount
    assert mounts["app"].endswith(":ro")
    assert not mounts["sidecar"].endswith(":ro")
    # The sidecar's environment and command are settings cm-sidecar accepts.
    env = {k: str(v) for k, v in services["sidecar"]["environment"].items()}
    settings = print_config(*services["sidecar"]["command"], env=env)
    assert settings["server"] == [env["CLUSTERMAP_SERVER"]]


def test_kubernetes_pod_shares_a_memory_emptydir_with_its_sidecar() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    docs = list(yaml.safe_load_all((DOCKER / "kubernetes.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {
        ("Deployment", "example-app"),
        ("Deployment", "cm-server"),
        ("Service", "cm-server"),
    }
    pod = next(d for d in docs if d["metadata"]["name"] == "example-app")["spec"]["template"][
        "spec"
    ]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (volume,) = pod["volumes"]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "cm-sidecar")
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    # The emptyDir (0777) is made sticky before the sidecar starts, or it refuses the directory.
    first = pod["initContainers"][0]
    assert first["command"][:2] == ["chmod", "1777"], first
    assert first["volumeMounts"][0]["mountPath"] == sidecar["volumeMounts"][0]["mountPath"]
    app = next(c for c in pod["containers"] if c["name"] == "app")
    env = {c["name"]: {e["name"]: e["value"] for e in c["env"]} for c in (sidecar, app)}
    for container in (sidecar, app):
        (mount,) = container["volumeMounts"]
        assert mount["name"] == volume["name"]
        region = env[container["name"]]["CLUSTERMAP_REGION"]
        assert PurePosixPath(region).parent == PurePosixPath(mount["mountPath"])
    assert app["volumeMounts"][0]["readOnly"] is True
    service = next(d for d in docs if d["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    assert env["cm-sidecar"]["CLUSTERMAP_SERVER"] == f"{service['metadata']['name']}:{port}"


@pytest.mark.parametrize(
    "doc",
    [
        "docs/quickstart.md",
        "docs/deployment.md",
        "docs/operations.md",
        "client/README.md",
        "sidecar/README.md",
        "docker/README.md",
    ],
)
def test_user_docs_name_files_and_anchors_that_exist(doc: str) -> None:
    """Links and repository paths in the user docs lead somewhere (they are copied from)."""
    path = ROOT / doc
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc}: {target}"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{doc}: #{anchor} not in {linked.name}"
    for name in re.findall(r"`((?:client|sidecar|docker)/[\w./-]+)`", text):
        assert (ROOT / name).exists(), f"{doc}: {name}"
