"""The deployment files, checked without a Docker engine or systemd: docker/compose.yaml's
structure, the Dockerfile's install steps against the Makefile's, the systemd units' keys, and
every command they run parsed by resbm's own argument parser (a renamed flag breaks them here,
not on a user's machine)."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
yaml = pytest.importorskip("yaml", reason="pyyaml is a dev extra: pip install -e '.[dev]'")


def parses(argv: list[str]):
    """argv as `resbm ARGV` would parse it; an unknown flag or command fails the test."""
    from resbm.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"`resbm {shlex.join(argv)}` does not parse (exit {err.code})")


def makefile_torch_spec() -> str:
    found = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer defines TORCH_SPEC"
    return found.group(1)


# ---- Dockerfile -----------------------------------------------------------------------------
def dockerfile_lines() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    text = (ROOT / "docker/Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_dockerfile_installs_the_makefiles_torch_first_then_the_project():
    lines = dockerfile_lines()
    args = dict(ln.split(" ", 1)[1].split("=", 1) for ln in lines if ln.startswith("ARG "))
    assert args["TORCH_SPEC"] == makefile_torch_spec()
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"  # CPU by default
    runs = [i for i, ln in enumerate(lines) if ln.startswith("RUN ")]
    torch_step = next(i for i in runs if '--index-url "${TORCH_INDEX}" "${TORCH_SPEC}"' in lines[i])
    project_step = next(i for i in runs if re.search(r"pip install \.(\s|$)", lines[i]))
    assert torch_step < project_step
    copies = [i for i, ln in enumerate(lines) if ln.startswith("COPY ")]
    assert all(torch_step < i < project_step for i in copies)  # torch's layer survives edits


def test_dockerfile_runs_resbm_as_a_user_with_a_volume_ports_and_a_health_check():
    lines = dockerfile_lines()
    first = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in reversed(lines)}
    assert first["FROM"].startswith("python:3.11")
    assert first["USER"] not in ("root", "0")
    assert "/var/lib/resbm" in first["VOLUME"]
    assert {"7000/tcp", "7100/tcp", "7200/tcp", "8080/tcp", "9100/tcp"} <= set(
        first["EXPOSE"].split()
    )
    assert first["ENTRYPOINT"] == '["resbm"]'
    health = first["HEALTHCHECK"]
    command = health.split("CMD ", 1)[1].split("||")[0]
    argv = shlex.split(command.replace("$HEALTHCHECK_ADDR", "127.0.0.1:7000"))
    assert argv[0] == "resbm"
    args = parses(argv[1:])
    assert args.command == "doctor" and args.health == "127.0.0.1:7000"
    ignore = (ROOT / "docker/Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p for p in ignore if p and not p.startswith("#")]
    assert patterns[0] == "*" and "!resbm/" in patterns  # an allow-list: no .venv/ sent


# ---- compose --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker/compose.yaml").read_text())


def test_compose_runs_a_coordinator_and_four_nodes_that_depend_on_it(compose):
    services = compose["services"]
    assert set(services) == {"coordinator", "node1", "node2", "node3", "node4"}
    coord = services["coordinator"]
    assert coord["build"]["dockerfile"] == "docker/Dockerfile"
    assert coord["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/")
    for name, svc in services.items():
        assert svc["image"] == coord["image"], name  # one image for every process
        assert svc["restart"] == "on-failure", name
        assert "swarm_token" in svc["secrets"], name
        (volume,) = svc["volumes"]
        assert volume == f"{name}:/var/lib/resbm" and name in compose["volumes"]
        if name != "coordinator":
            assert "coordinator" in svc["depends_on"], name
    assert compose["secrets"]["swarm_token"]["file"]
    published = {p.split(":")[-2] for p in coord["ports"]}  # [HOST_IP:]HOST_PORT:CONTAINER
    assert published == {"7100", "7200", "8080"}


def test_every_compose_command_parses_with_resbms_own_parser(compose):
    services = compose["services"]
    coord = parses(services["coordinator"]["command"])
    assert coord.command == "coordinator"
    flags = vars(coord)
    assert flags["listen"] == "0.0.0.0:7100" and flags["http_listen"] == "0.0.0.0:8080"
    assert flags["security.token_file"] == "/run/secrets/swarm_token"
    announced = set()
    for name in ("node1", "node2", "node3", "node4"):
        args = vars(parses(services[name]["command"]))
        assert args["command"] == "join"
        assert args["coordinator"] == "coordinator:7100"
        assert args["announce"] == f"{name}:7000"  # its compose DNS name: peers dial it
        assert args["security.token_file"] == "/run/secrets/swarm_token"
        assert str(args["state_dir"]).startswith("/var/lib/resbm")
        announced.add(args["announce"])
    assert len(announced) == 4
    health = parses(services["coordinator"]["healthcheck"]["test"][2:])
    assert health.health == "127.0.0.1:7100"


# ---- systemd --------------------------------------------------------------------------------
def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((ROOT / "deploy" / name).read_text())
    return parser


def exec_start(service: configparser.SectionProxy) -> list[str]:
    argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert argv[0].endswith("/bin/resbm")
    return argv[1:]


@pytest.mark.parametrize(
    "name, command", [("resbm-node.service", "join"), ("resbm-coordinator.service", "coordinator")]
)
def test_systemd_units_restart_on_crash_not_on_config_errors_and_drain(name, command):
    parsed = unit(name)
    assert {"Unit", "Service", "Install"} <= set(parsed.sections())
    svc = parsed["Service"]
    assert svc["User"] not in ("root", "")
    assert svc["Restart"] == "on-failure"
    assert "2" in svc["RestartPreventExitStatus"].split()
    assert int(svc["RestartSec"].rstrip("s")) >= 1
    assert svc["EnvironmentFile"].startswith("/etc/resbm/")
    assert svc["KillMode"] == "mixed"  # SIGTERM to the process only: its DHT child must live on
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"].rstrip("s")) >= 60  # the drain's own limit is 60 s
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    writable = svc["ReadWritePaths"].split()
    assert svc["StandardError"] == "journal"
    args = parses(exec_start(svc))
    assert args.command == command
    flags = vars(args)
    log_file = Path(flags["ops.log_file"])
    assert any(log_file.is_relative_to(w) for w in writable), "the log file must be writable"
    state = flags.get("state_dir") or flags.get("events")
    assert any(Path(state).is_relative_to(w) for w in writable), "the state must be writable"
