"""Fast checks of the container files (no image is built; scripts/check_docker.sh builds and runs one).

Run: python -m pytest tests/test_docker_files.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        kw, _, rest = buf.partition(" ")
        out.append((kw.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _all(kw: str) -> list[str]:
    return [args for k, args in _instructions() if k == kw]


def test_base_image_is_a_build_argument() -> None:
    ins = _instructions()
    first_from = next(i for i, (k, _) in enumerate(ins) if k == "FROM")
    pre_args = [a for k, a in ins[:first_from] if k == "ARG"]
    assert any(a.startswith("BASE_IMAGE=") for a in pre_args), "ARG BASE_IMAGE=... must come before FROM"
    assert ins[first_from][1] in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_torch_version_argument_fits_the_project_pin() -> None:
    from packaging.requirements import Requirement

    args = dict(a.split("=", 1) for a in _all("ARG") if "=" in a)
    version = args["TORCH_VERSION"].strip('"')
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(version), f"TORCH_VERSION {version} is outside pyproject's {torch_req}"
    assert "TORCH_SPEC" in " ".join(_all("ARG")), "TORCH_SPEC lets the check use a local wheel"


def test_runs_as_non_root_user() -> None:
    users = _all("USER")
    assert users and users[-1] == "swarmtune"


def test_entrypoint_and_healthcheck() -> None:
    assert [json.loads(a) for a in _all("ENTRYPOINT")][-1] == ["swarmtune"]
    hc = _all("HEALTHCHECK")
    assert len(hc) == 1
    cmd = hc[0].split("CMD", 1)[1].strip()
    assert json.loads(cmd) == ["swarmtune", "status", "--healthcheck"]  # exits 1 when the node is stalled


def test_volumes_and_state_locations() -> None:
    volumes: set[str] = set()
    for v in _all("VOLUME"):
        volumes.update(json.loads(v) if v.startswith("[") else v.split())
    assert {"/data", "/cache"} <= volumes
    env = " ".join(_all("ENV"))
    assert "SWARMTUNE_HOME=/data" in env
    assert re.search(r"HF_HOME=/cache/", env) and re.search(r"SWARMTUNE_CACHE=/cache/", env)


def test_every_package_is_copied_and_not_ignored() -> None:
    """A new top-level package must reach the image: COPY it, and let it through .dockerignore."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tops = {p.split(".")[0] for p in py["tool"]["setuptools"]["packages"]}
    copied: set[str] = set()
    for args in _all("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        copied.update(Path(p).parts[0] for p in parts[:-1])
    assert tops | {"pyproject.toml", "README.md"} <= copied
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f".dockerignore hides {sorted(copied - allowed)}"


def test_compose_swarm_is_wired() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"node-a", "node-b", "node-c"} <= set(services)
    ip = services["node-a"]["networks"]["swarm"]["ipv4_address"]
    for name in ("node-b", "node-c"):
        s = services[name]
        assert f"/ip4/{ip}/tcp/31337/p2p/" in " ".join(s["command"]), name
        assert s["depends_on"]["node-a"]["condition"] == "service_healthy"
    for name in ("node-a", "node-b", "node-c"):
        vols = services[name]["volumes"]
        assert any(v.split(":")[1] == "/swarm" for v in vols), f"{name} lacks the shared manifest volume"
        assert any(v.split(":")[1] == "/data" for v in vols)
    datas = [next(v.split(":")[0] for v in services[n]["volumes"] if v.split(":")[1] == "/data") for n in ("node-a", "node-b", "node-c")]
    assert len(set(datas)) == 3, "each node needs its own key/ledger volume"
    assert set(doc["volumes"]) >= set(datas) | {"swarm"}


def test_check_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(ROOT / "scripts" / "check_docker.sh")], check=True, timeout=30)
