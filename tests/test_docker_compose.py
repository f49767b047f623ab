"""docker-compose.yml is valid and describes a replica set and the example service.

No Docker engine runs here, so the file is checked with the compose client's `config`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine (docker compose or docker-compose)")

    done = subprocess.run(
        [*command, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    config = done.stdout
    assert "--replSet" in config and "rs.initiate" in config
    assert "condition: service_healthy" in config
    assert "MONGODB_URI: mongodb://mongo:27017/?replicaSet=rs0" in config


def test_dockerfile_runs_the_example_service() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert "examples.fastapi_app:main" in dockerfile
    assert "COPY migrations ./migrations" in dockerfile
