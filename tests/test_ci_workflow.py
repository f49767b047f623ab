"""The GitHub Actions workflow: valid for GitHub, and testing what it says it tests.

It cannot run here (no Docker, no MongoDB), so it is checked the way GitHub would read it:
against GitHub's own workflow schema, which check-jsonschema ships (no network needed), and
for the promises a user reading it relies on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "test.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load(WORKFLOW.read_text())
    return loaded


def runs(job: dict[str, Any]) -> list[str]:
    """Every shell line the job's steps run."""
    return [line.strip() for step in job["steps"] for line in step.get("run", "").splitlines()]


def test_workflow_is_valid_for_github() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(WORKFLOW),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_matrix_names_mongodb_6_7_and_8_as_strings(workflow: dict[str, Any]) -> None:
    matrix = workflow["jobs"]["mongodb"]["strategy"]["matrix"]

    # Strings: YAML would read an unquoted 8.0 as the number 8, and pull mongo:8.
    assert matrix["mongodb"] == ["6.0", "7.0", "8.0"]


def test_every_job_runs_make_test_on_python_3_12(workflow: dict[str, Any]) -> None:
    for name, job in workflow["jobs"].items():
        assert "make test" in runs(job), name
        pythons = [
            step["with"]["python-version"]
            for step in job["steps"]
            if step.get("uses", "").startswith("actions/setup-python")
        ]
        assert pythons == ["3.12"], name


def test_real_mongodb_is_a_replica_set_with_test_commands(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["mongodb"]
    script = "\n".join(runs(job))

    assert job["env"]["MONGODB_URI"] == "mongodb://localhost:27017/?replicaSet=rs0"
    assert '"mongo:${{ matrix.mongodb }}"' in script
    for flag in ("--replSet rs0", "--setParameter enableTestCommands=1", "--bind_ip_all"):
        assert flag in script
    assert 'rs.initiate({_id: "rs0", members: [{_id: 0, host: "localhost:27017"}]})' in script
    # make test starts only once the member is PRIMARY (myState 1).
    steps = [step.get("name", "") for step in job["steps"]]
    assert steps.index("Wait until it is PRIMARY") < steps.index("make test")
    assert "rs.status().myState" in script


def test_embedded_job_has_no_mongodb_uri(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["embedded"]

    assert "MONGODB_URI" not in job.get("env", {})
    assert "MONGODB_URI" not in workflow.get("env", {})
    assert not any("docker" in line for line in runs(job))
