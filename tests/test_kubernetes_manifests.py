"""The Kubernetes manifests in deploy/kubernetes: valid, and true to docs/kubernetes.md.

No cluster runs here. Every manifest is validated offline against the schemas of a pinned
Kubernetes version that `kubernetes-validate` ships, in strict mode (a misspelt or unknown
field is an error, as `kubectl apply --validate=strict` makes it). Then the rules the doc
states are checked on them, so a manifest cannot drift away from its doc: each rule is a
function, run once on the real manifests and once on a copy broken on purpose, so every
check is seen to fail when it should.

The Helm chart's templates use plain value references only, so they are rendered here by a
small substitution (``render_helm_template``) that refuses anything else, instead of a helm
binary.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from bootmigrate import Settings, cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
HELM = DEPLOY / "helm"
DOC = ROOT / "docs" / "kubernetes.md"

# The oldest Kubernetes the manifests are written for (startup probes, pod failure policies,
# Job TTLs are all older). kubernetes-validate>=1.30 ships its schemas.
KUBERNETES_VERSION = "1.30.0"
HELM_RELEASE = "shop"

# What the manifests are sized against: the library's defaults, and the longest run of one
# release's migrations the examples assume (docs/kubernetes.md, "Probes").
DEFAULTS = Settings()
SHUTDOWN_GRACE = float(getattr(DEFAULTS, "shutdown_grace", 20.0))
WAIT_TIMEOUT = DEFAULTS.wait_timeout
LEASE = DEFAULTS.lease
MIGRATIONS_BUDGET = 240.0
BOOT_MARGIN = 30.0  # the process starting and connecting
TERMINATION_MARGIN = 10.0  # the server stopping after the migration's grace
CLI_WAIT_TIMEOUT = 300.0  # `bootmigrate up --wait-timeout` default

# Which boot mode each pattern's app pods must run in.
PATTERN_MODES = {
    "lifespan": "apply",
    "job": "wait",
    "helm": "wait",
    "serve-while-migrating": "background",
}
WAIT_ONLY_PATTERNS = ("job", "helm")


@dataclass(frozen=True)
class Manifest:
    """One Kubernetes object, with the file it came from."""

    path: str  # relative to deploy/kubernetes
    doc: dict[str, Any]

    @property
    def pattern(self) -> str:
        return self.path.split("/")[0]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def label(self) -> str:
        return f"{self.path}:{self.kind}/{self.doc['metadata']['name']}"


# --- the Helm substitution ----------------------------------------------------------------

TEMPLATE_ACTION = re.compile(r"{{(.*?)}}")
PLAIN_REFERENCE = re.compile(
    r"^ \.(?P<root>Values|Release|Chart)(?P<path>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)"
    r"(?P<quote> \| quote)? $"
)


class UnsupportedTemplate(ValueError):
    """A template action this substitution does not render as Helm would."""


def render_helm_template(text: str, values: dict[str, Any], chart: dict[str, Any]) -> str:
    """Render ``text`` as Helm would, for the only actions allowed here: ``{{ .Values.a.b }}``,
    ``{{ .Release.Name }}``, ``{{ .Chart.Name|Version|AppVersion }}``, each optionally
    ``| quote``. Anything else raises :class:`UnsupportedTemplate`: render such a chart with
    helm and check the output in instead."""
    scopes: dict[str, dict[str, Any]] = {
        "Values": values,
        "Release": {"Name": HELM_RELEASE, "Service": "Helm"},
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart["appVersion"],
        },
    }

    def substitute(action: re.Match[str]) -> str:
        reference = PLAIN_REFERENCE.match(action.group(1))
        if reference is None:
            raise UnsupportedTemplate(f"unsupported template action {action.group(0)!r}")
        value: Any = scopes[reference["root"]]
        for key in reference["path"].split(".")[1:]:
            if not isinstance(value, dict) or key not in value:
                raise UnsupportedTemplate(f"{action.group(0)!r}: no value {key!r}")
            value = value[key]
        text = _helm_text(value, action.group(0))
        return json.dumps(text) if reference["quote"] else text

    return TEMPLATE_ACTION.sub(substitute, text)


def _helm_text(value: Any, action: str) -> str:
    """A scalar as Helm prints it. Helm reads values.yaml numbers as float64 and prints them
    with Go's %v, which switches to exponent form at 1e6 ("1e+06"): refuse those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if abs(value) >= 1e6 or value != int(value):
            raise UnsupportedTemplate(f"{action!r}: Helm would not print {value!r} as is")
        return str(int(value))
    if isinstance(value, str):
        return value
    raise UnsupportedTemplate(f"{action!r} is not a scalar: {value!r}")


# --- loading ------------------------------------------------------------------------------


def _not_manifests(path: Path) -> bool:
    return path.name == "kustomization.yaml" or path.is_relative_to(HELM)


def load_manifests() -> list[Manifest]:
    """Every object in deploy/kubernetes, the Helm chart's templates rendered."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if _not_manifests(path):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append(Manifest(str(path.relative_to(DEPLOY)), doc))
    values = yaml.safe_load((HELM / "values.yaml").read_text())
    chart = yaml.safe_load((HELM / "Chart.yaml").read_text())
    for path in sorted((HELM / "templates").glob("*.yaml")):
        rendered = render_helm_template(path.read_text(), values, chart)
        for doc in yaml.safe_load_all(rendered):
            if doc:
                found.append(Manifest(str(path.relative_to(DEPLOY)), doc))
    return found


MANIFESTS = load_manifests()


# --- reading pods -------------------------------------------------------------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    if doc["kind"] == "Pod":
        pod: dict[str, Any] = doc["spec"]
        return pod
    return None


def containers(spec: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    main: list[dict[str, Any]] = spec["containers"]
    return [*spec.get("initContainers", []), *main] if init else main


def command_line(container: dict[str, Any]) -> list[str]:
    return [str(word) for word in container.get("command", []) + container.get("args", [])]


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def option(line: list[str], name: str, default: float) -> float:
    """The value of ``--name VALUE`` (or ``--name=VALUE``) in a command line."""
    for i, word in enumerate(line):
        if word == name and i + 1 < len(line):
            return float(line[i + 1])
        if word.startswith(f"{name}="):
            return float(word.split("=", 1)[1])
    return default


def probe_budget(probe: dict[str, Any]) -> float:
    """Seconds a probe lets a container fail before the kubelet acts (Kubernetes' defaults)."""
    return float(
        probe.get("initialDelaySeconds", 0)
        + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    )


def pre_stop_seconds(container: dict[str, Any]) -> float:
    """How long the preStop hook delays SIGTERM: it counts against the grace period."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", (
        f"a preStop hook whose duration is unknown: {hook}; use `sleep N`"
    )
    return float(command[1])


def boot_mode(container: dict[str, Any]) -> str | None:
    mode = env_values(container).get("MIGRATE_AT_BOOT")
    return None if mode is None else str(mode)


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind]


def is_bootmigrate_image(container: dict[str, Any]) -> bool:
    return str(container["image"]).startswith("bootmigrate-example:")


# --- the rules ----------------------------------------------------------------------------


def check_termination_grace(manifests: list[Manifest]) -> None:
    """terminationGracePeriodSeconds >= preStop + shutdown_grace + 10, for every pod that can
    run a migration: SIGKILL must not land inside a migration's shutdown_grace."""
    pods = [m for m in manifests if pod_spec(m.doc) is not None]
    assert pods
    for m in pods:
        spec = pod_spec(m.doc)
        assert spec is not None
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in containers(spec):
            needed = pre_stop_seconds(c) + SHUTDOWN_GRACE + TERMINATION_MARGIN
            assert grace >= needed, (
                f"{m.label}: terminationGracePeriodSeconds {grace} < preStop "
                f"{pre_stop_seconds(c):g} + shutdown_grace {SHUTDOWN_GRACE:g} + "
                f"{TERMINATION_MARGIN:g}"
            )


def check_probes(manifests: list[Manifest]) -> None:
    """Every app container has startup, readiness and liveness probes; liveness and startup
    on /healthz (never on the migration), readiness on /readyz."""
    deployments = of_kind(manifests, "Deployment")
    assert deployments
    for m in deployments:
        spec = pod_spec(m.doc)
        assert spec is not None
        for c in containers(spec, init=False):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{m.label}: container {c['name']} has no {probe}"
            paths = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")}
            paths["livenessProbe"] = c["livenessProbe"]["httpGet"]["path"]
            assert paths == {
                "startupProbe": "/healthz",
                "readinessProbe": "/readyz",
                "livenessProbe": "/healthz",
            }, f"{m.label}: probe paths {paths}"


def check_startup_budget(manifests: list[Manifest]) -> None:
    """A pod that migrates or waits in its lifespan does not listen until done: its startup
    probe must outlast the longest wait (wait_timeout) and a takeover (a lease) plus the
    migrations, plus the boot. Serving pods (background) only need to start."""
    needed = max(WAIT_TIMEOUT, LEASE + MIGRATIONS_BUDGET) + BOOT_MARGIN
    checked = 0
    for m in of_kind(manifests, "Deployment"):
        spec = pod_spec(m.doc)
        assert spec is not None
        for c in containers(spec, init=False):
            if boot_mode(c) in ("apply", "wait"):
                checked += 1
                budget = probe_budget(c["startupProbe"])
                assert budget >= needed, (
                    f"{m.label}: startupProbe allows {budget:g} s < {needed:g} s "
                    f"(max(wait_timeout, lease + {MIGRATIONS_BUDGET:g} s) + {BOOT_MARGIN:g} s)"
                )
    assert checked


def check_boot_modes(manifests: list[Manifest]) -> None:
    """Each pattern's app containers say their boot mode, and it is the pattern's."""
    for m in of_kind(manifests, "Deployment"):
        spec = pod_spec(m.doc)
        assert spec is not None
        for c in containers(spec, init=False):
            assert boot_mode(c) == PATTERN_MODES[m.pattern], (
                f"{m.label}: MIGRATE_AT_BOOT={boot_mode(c)}, the {m.pattern} pattern needs "
                f"{PATTERN_MODES[m.pattern]}"
            )
    assert {m.pattern for m in of_kind(manifests, "Deployment")} == set(PATTERN_MODES)


def check_progress_deadline(manifests: list[Manifest]) -> None:
    """A rollout waiting on a long but healthy migration is not reported as stalled."""
    for m in of_kind(manifests, "Deployment"):
        spec = pod_spec(m.doc)
        assert spec is not None
        init_wait = sum(
            option(command_line(c), "--timeout", WAIT_TIMEOUT)
            for c in spec.get("initContainers", [])
        )
        needed = init_wait + max(WAIT_TIMEOUT, LEASE + MIGRATIONS_BUDGET) + BOOT_MARGIN
        deadline = m.doc["spec"].get("progressDeadlineSeconds", 600)
        assert deadline >= needed, f"{m.label}: progressDeadlineSeconds {deadline} < {needed:g}"


def check_rolling_update(manifests: list[Manifest]) -> None:
    """Old pods serve until new ones are ready (migrated): maxUnavailable 0, maxSurge > 0."""
    for m in of_kind(manifests, "Deployment"):
        strategy = m.doc["spec"].get("strategy", {})
        assert strategy.get("type") == "RollingUpdate", f"{m.label}: strategy {strategy}"
        rolling = strategy.get("rollingUpdate", {})
        assert rolling.get("maxUnavailable") == 0, f"{m.label}: {rolling}"
        assert rolling.get("maxSurge") not in (None, 0, "0%"), f"{m.label}: {rolling}"


def check_migration_jobs(manifests: list[Manifest]) -> None:
    """Each Job runs `bootmigrate up` once: no restarts in place, a small backoffLimit, a
    deadline that covers its wait, a takeover and the migrations, and a TTL."""
    jobs = of_kind(manifests, "Job")
    assert {m.pattern for m in jobs} == set(WAIT_ONLY_PATTERNS)
    for m in jobs:
        spec = m.doc["spec"]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never", m.label
        (container,) = containers(pod)
        line = command_line(container)
        assert line[:2] == ["bootmigrate", "up"], f"{m.label}: runs {line}"
        assert 0 <= spec.get("backoffLimit", 6) <= 2, f"{m.label}: backoffLimit"
        needed = option(line, "--wait-timeout", CLI_WAIT_TIMEOUT) + LEASE + MIGRATIONS_BUDGET
        needed += BOOT_MARGIN
        deadline = spec.get("activeDeadlineSeconds", 0)
        assert deadline >= needed, f"{m.label}: activeDeadlineSeconds {deadline} < {needed:g}"
        assert "ttlSecondsAfterFinished" in spec, f"{m.label}: no ttlSecondsAfterFinished"


def check_helm_hook(manifests: list[Manifest]) -> None:
    """The chart's Job is a pre-install,pre-upgrade hook with a weight and a delete policy
    that lets the next release create it again; it uses no resource of its own chart (a
    pre-install hook runs before any of them exists)."""
    chart = [m for m in manifests if m.pattern == "helm"]
    jobs = of_kind(chart, "Job")
    assert len(jobs) == 1
    annotations = jobs[0].doc["metadata"].get("annotations", {})
    hooks = set(annotations.get("helm.sh/hook", "").split(","))
    assert {"pre-install", "pre-upgrade"} <= hooks, f"helm.sh/hook: {hooks}"
    weight = annotations.get("helm.sh/hook-weight")
    assert isinstance(weight, str) and re.fullmatch(r"-?\d+", weight), f"hook-weight {weight!r}"
    policies = annotations.get("helm.sh/hook-delete-policy", "").split(",")
    assert "before-hook-creation" in policies, f"helm.sh/hook-delete-policy: {policies}"
    used = {
        ref["secretKeyRef"]["name"]
        for c in containers(jobs[0].doc["spec"]["template"]["spec"])
        for ref in env_values(c).values()
        if isinstance(ref, dict) and "secretKeyRef" in ref
    }
    created = {m.doc["metadata"]["name"] for m in chart if m.kind == "Secret"}
    assert not used & created, f"the hook needs Secrets the chart creates after it: {used}"
    for m in chart:
        if m is not jobs[0]:
            assert "helm.sh/hook" not in m.doc["metadata"].get("annotations", {}), m.label


def check_wait_only(manifests: list[Manifest]) -> None:
    """Wait-only app pods never run `up`; an init container `bootmigrate wait` waits at
    least as long as the Job may run."""
    deployments = [m for m in of_kind(manifests, "Deployment") if m.pattern in WAIT_ONLY_PATTERNS]
    assert {m.pattern for m in deployments} == set(WAIT_ONLY_PATTERNS)
    for m in deployments:
        spec = pod_spec(m.doc)
        assert spec is not None
        for c in containers(spec):
            line = command_line(c)
            assert "up" not in line, f"{m.label}: container {c['name']} runs {line}"
        for c in containers(spec, init=False):
            assert boot_mode(c) == "wait", f"{m.label}: MIGRATE_AT_BOOT={boot_mode(c)}"
        jobs = [j for j in of_kind(manifests, "Job") if j.pattern == m.pattern]
        deadline = max(j.doc["spec"]["activeDeadlineSeconds"] for j in jobs)
        for c in spec.get("initContainers", []):
            line = command_line(c)
            assert line[:2] == ["bootmigrate", "wait"], f"{m.label}: init runs {line}"
            timeout = option(line, "--timeout", WAIT_TIMEOUT)
            assert timeout >= deadline, f"{m.label}: wait --timeout {timeout:g} < {deadline}"
    plain = pod_spec(next(m for m in deployments if m.pattern == "job").doc)
    assert plain is not None and plain.get("initContainers"), "job/ shows the init container"


def check_release_consistency(manifests: list[Manifest]) -> None:
    """Within a pattern, every bootmigrate container runs one image, names its build after
    the image tag, reads the URI from the Secret, and the CLI's database is the app's."""
    images: dict[str, set[str]] = {}
    for m in manifests:
        spec = pod_spec(m.doc)
        if spec is None:
            continue
        for c in containers(spec):
            if not is_bootmigrate_image(c):
                continue
            images.setdefault(m.pattern, set()).add(c["image"])
            env = env_values(c)
            assert env.get("MONGODB_URI", {}).get("secretKeyRef"), f"{m.label}: MONGODB_URI"
            tag = c["image"].split(":", 1)[1]
            assert env.get("BOOTMIGRATE_BUILD", tag) == tag, f"{m.label}: build != {tag}"
            if "MONGODB_DB" in env:
                assert env["MONGODB_DB"] == env.get("BOOTMIGRATE_DB"), f"{m.label}: databases"
    for pattern, found in images.items():
        assert len(found) == 1, f"{pattern}: several images {found}"


def check_command_lines(manifests: list[Manifest]) -> None:
    """Every `bootmigrate ...` a container runs is a command line this build's CLI accepts
    (a renamed or misspelt option fails here, not in a crash-looping pod)."""
    checked = 0
    for m in manifests:
        spec = pod_spec(m.doc)
        for c in containers(spec) if spec is not None else []:
            line = command_line(c)
            if line[:1] != ["bootmigrate"]:
                continue
            checked += 1
            command = cli.main.get_command(click.Context(cli.main), line[1])
            assert command is not None, f"{m.label}: no command {line[1]!r}"
            try:
                command.make_context(line[1], line[2:])
            except click.UsageError as exc:
                raise AssertionError(f"{m.label}: {line}: {exc.format_message()}") from None
    assert checked


RULES: dict[str, Callable[[list[Manifest]], None]] = {
    "termination-grace": check_termination_grace,
    "probes": check_probes,
    "startup-budget": check_startup_budget,
    "boot-modes": check_boot_modes,
    "progress-deadline": check_progress_deadline,
    "rolling-update": check_rolling_update,
    "migration-jobs": check_migration_jobs,
    "helm-hook": check_helm_hook,
    "wait-only": check_wait_only,
    "release-consistency": check_release_consistency,
    "command-lines": check_command_lines,
}


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.label for m in MANIFESTS])
def test_manifest_is_valid_in_strict_mode(manifest: Manifest) -> None:
    validated = kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)

    assert validated == "1.30"


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(of_kind(MANIFESTS, "Deployment")[0].doc)
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_pattern_is_there() -> None:
    assert {m.pattern for m in MANIFESTS} == {*PATTERN_MODES, "tools"}
    assert {m.kind for m in MANIFESTS} == {"Deployment", "Service", "Job", "Pod"}


@pytest.mark.parametrize("rule", RULES.values(), ids=list(RULES))
def test_manifests_follow_the_rule(rule: Callable[[list[Manifest]], None]) -> None:
    rule(MANIFESTS)


def _containers_of(manifests: list[Manifest], kind: str, pattern: str) -> Iterator[dict[str, Any]]:
    for m in manifests:
        if m.kind == kind and m.pattern == pattern:
            spec = pod_spec(m.doc)
            assert spec is not None
            yield from containers(spec)


def _pod_of(manifests: list[Manifest], kind: str, pattern: str) -> dict[str, Any]:
    spec = next(pod_spec(m.doc) for m in manifests if m.kind == kind and m.pattern == pattern)
    assert spec is not None
    return spec


def _job(manifests: list[Manifest], pattern: str) -> dict[str, Any]:
    doc: dict[str, Any] = next(m.doc for m in manifests if m.kind == "Job" and m.pattern == pattern)
    return doc


def _deployment(manifests: list[Manifest], pattern: str) -> dict[str, Any]:
    doc: dict[str, Any] = next(
        m.doc for m in manifests if m.kind == "Deployment" and m.pattern == pattern
    )
    return doc


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    for e in container["env"]:
        if e["name"] == name:
            e.clear()
            e.update(name=name, value=value)
            return
    container["env"].append({"name": name, "value": value})


def _drop_env(container: dict[str, Any], name: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name]


def _app(manifests: list[Manifest], pattern: str) -> dict[str, Any]:
    app: dict[str, Any] = _pod_of(manifests, "Deployment", pattern)["containers"][0]
    return app


# Each breaks one thing the doc forbids; the rule named must catch it.
BREAKAGES: dict[str, tuple[str, Callable[[list[Manifest]], None]]] = {
    "default-grace-with-prestop": (
        "termination-grace",
        lambda ms: _pod_of(ms, "Deployment", "lifespan").pop("terminationGracePeriodSeconds"),
    ),
    "grace-below-shutdown-grace": (
        "termination-grace",
        lambda ms: _pod_of(ms, "Job", "job").update(terminationGracePeriodSeconds=25),
    ),
    "long-prestop": (
        "termination-grace",
        lambda ms: _app(ms, "serve-while-migrating")["lifecycle"]["preStop"]["exec"].update(
            command=["sleep", "15"]
        ),
    ),
    "no-startup-probe": (
        "probes",
        lambda ms: _app(ms, "lifespan").pop("startupProbe"),
    ),
    "liveness-on-readyz": (
        "probes",
        lambda ms: _app(ms, "serve-while-migrating")["livenessProbe"]["httpGet"].update(
            path="/readyz"
        ),
    ),
    "startup-on-readyz": (
        "probes",
        lambda ms: _app(ms, "serve-while-migrating")["startupProbe"]["httpGet"].update(
            path="/readyz"
        ),
    ),
    "readiness-on-healthz": (
        "probes",
        lambda ms: _app(ms, "helm")["readinessProbe"]["httpGet"].update(path="/healthz"),
    ),
    "startup-shorter-than-wait-timeout": (
        "startup-budget",
        lambda ms: _app(ms, "lifespan")["startupProbe"].update(failureThreshold=30),
    ),
    "wait-only-startup-too-short": (
        "startup-budget",
        lambda ms: _app(ms, "helm")["startupProbe"].update(periodSeconds=2),
    ),
    "lifespan-in-background-mode": (
        "boot-modes",
        lambda ms: _set_env(_app(ms, "lifespan"), "MIGRATE_AT_BOOT", "background"),
    ),
    "mode-left-to-default": (
        "boot-modes",
        lambda ms: _drop_env(_app(ms, "serve-while-migrating"), "MIGRATE_AT_BOOT"),
    ),
    "progress-deadline-below-init-wait": (
        "progress-deadline",
        lambda ms: _deployment(ms, "job")["spec"].pop("progressDeadlineSeconds"),
    ),
    "max-unavailable": (
        "rolling-update",
        lambda ms: _deployment(ms, "lifespan")["spec"]["strategy"]["rollingUpdate"].update(
            maxUnavailable=1
        ),
    ),
    "recreate": (
        "rolling-update",
        lambda ms: _deployment(ms, "serve-while-migrating")["spec"].update(
            strategy={"type": "Recreate"}
        ),
    ),
    "job-runs-something-else": (
        "migration-jobs",
        lambda ms: _job(ms, "job")["spec"]["template"]["spec"]["containers"][0].update(
            command=["bootmigrate", "status"]
        ),
    ),
    "job-default-backoff": (
        "migration-jobs",
        lambda ms: _job(ms, "helm")["spec"].pop("backoffLimit"),
    ),
    "job-deadline-shorter-than-its-wait": (
        "migration-jobs",
        lambda ms: _job(ms, "job")["spec"].update(activeDeadlineSeconds=300),
    ),
    "job-restarts-in-place": (
        "migration-jobs",
        lambda ms: _job(ms, "job")["spec"]["template"]["spec"].update(restartPolicy="OnFailure"),
    ),
    "job-without-ttl": (
        "migration-jobs",
        lambda ms: _job(ms, "job")["spec"].pop("ttlSecondsAfterFinished"),
    ),
    "hook-not-on-install": (
        "helm-hook",
        lambda ms: _job(ms, "helm")["metadata"]["annotations"].update(
            {"helm.sh/hook": "pre-upgrade"}
        ),
    ),
    "hook-without-weight": (
        "helm-hook",
        lambda ms: _job(ms, "helm")["metadata"]["annotations"].pop("helm.sh/hook-weight"),
    ),
    "hook-deleted-only-on-success": (
        "helm-hook",
        lambda ms: _job(ms, "helm")["metadata"]["annotations"].update(
            {"helm.sh/hook-delete-policy": "hook-succeeded"}
        ),
    ),
    "hook-needs-a-chart-secret": (
        "helm-hook",
        lambda ms: ms.append(
            Manifest(
                "helm/templates/secret.yaml", {"kind": "Secret", "metadata": {"name": "mongodb"}}
            )
        ),
    ),
    "wait-only-app-applies": (
        "wait-only",
        lambda ms: _set_env(_app(ms, "helm"), "MIGRATE_AT_BOOT", "apply"),
    ),
    "wait-only-init-runs-up": (
        "wait-only",
        lambda ms: _pod_of(ms, "Deployment", "job")["initContainers"][0].update(
            command=["bootmigrate", "up"]
        ),
    ),
    "init-wait-shorter-than-job": (
        "wait-only",
        lambda ms: _pod_of(ms, "Deployment", "job")["initContainers"][0].update(
            command=["bootmigrate", "wait", "--timeout", "120"]
        ),
    ),
    "job-image-of-another-release": (
        "release-consistency",
        lambda ms: _job(ms, "job")["spec"]["template"]["spec"]["containers"][0].update(
            image="bootmigrate-example:0.9.0"
        ),
    ),
    "build-not-the-image-tag": (
        "release-consistency",
        lambda ms: _set_env(_app(ms, "lifespan"), "BOOTMIGRATE_BUILD", "1.0.1"),
    ),
    "misspelt-option": (
        "command-lines",
        lambda ms: _job(ms, "job")["spec"]["template"]["spec"]["containers"][0].update(
            command=["bootmigrate", "up", "--wait-timout", "300"]
        ),
    ),
    "no-such-command": (
        "command-lines",
        lambda ms: _pod_of(ms, "Deployment", "job")["initContainers"][0].update(
            command=["bootmigrate", "await", "--timeout", "600"]
        ),
    ),
    "not-a-number": (
        "command-lines",
        lambda ms: _job(ms, "helm")["spec"]["template"]["spec"]["containers"][0].update(
            command=["bootmigrate", "up", "--wait-timeout", "5m"]
        ),
    ),
    "cli-on-another-database": (
        "release-consistency",
        lambda ms: _set_env(_app(ms, "serve-while-migrating"), "BOOTMIGRATE_DB", "test"),
    ),
}


@pytest.mark.parametrize(("rule", "breakage"), BREAKAGES.values(), ids=list(BREAKAGES))
def test_each_rule_catches_its_breakage(
    rule: str, breakage: Callable[[list[Manifest]], None]
) -> None:
    broken = copy.deepcopy(MANIFESTS)
    breakage(broken)

    with pytest.raises(AssertionError):
        RULES[rule](broken)


def test_every_rule_is_seen_failing() -> None:
    assert {rule for rule, _ in BREAKAGES.values()} == set(RULES)


def test_kustomizations_list_every_manifest_of_their_pattern() -> None:
    for pattern in ("lifespan", "job", "serve-while-migrating"):
        directory = DEPLOY / pattern
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        files = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")

        assert sorted(kustomization["resources"]) == files, pattern


def test_helm_renderer_refuses_what_it_cannot_render() -> None:
    values = {"a": {"b": 1_000_000, "c": [1]}, "n": 600, "s": "x"}
    chart = {"name": "c", "version": "0.1.0", "appVersion": "1.0.0"}

    assert render_helm_template("{{ .Values.n }} {{ .Values.s | quote }}", values, chart) == (
        '600 "x"'
    )
    for text in (
        "{{- .Values.n }}",
        "{{ if .Values.n }}x{{ end }}",
        '{{ include "x" . }}',
        "{{ .Values.missing }}",
        "{{ .Values.a.b }}",
        "{{ .Values.a.c }}",
        "{{ .Values.n | int }}",
    ):
        with pytest.raises(UnsupportedTemplate):
            render_helm_template(text, values, chart)


def test_helm_templates_render_completely() -> None:
    values = yaml.safe_load((HELM / "values.yaml").read_text())
    chart = yaml.safe_load((HELM / "Chart.yaml").read_text())
    for path in (HELM / "templates").glob("*.yaml"):
        rendered = render_helm_template(path.read_text(), values, chart)

        assert "{{" not in rendered and "}}" not in rendered, path.name


# --- the doc ------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s#]+)(?:#([^)]*))?\)")
CODE_PATH = re.compile(
    r"`((?:deploy|docs|src|examples|tests|migrations|\.github)/[^`\s]*|Dockerfile"
    r"|docker-compose\.yml|README\.md)`"
)


def referenced_paths(text: str) -> set[Path]:
    """Files the doc names: relative links (from docs/), and paths in backticks (from the
    repository root)."""
    found = {
        (DOC.parent / target).resolve()
        for target, _ in LINK.findall(text)
        if not re.match(r"^[a-z]+:", target)
    }
    found |= {(ROOT / path.rstrip("/")).resolve() for path in CODE_PATH.findall(text)}
    return found


def test_doc_references_only_files_that_exist() -> None:
    text = DOC.read_text()
    paths = referenced_paths(text)

    missing = sorted(str(p.relative_to(ROOT)) for p in paths if not p.exists())
    assert not missing, f"docs/kubernetes.md names files that do not exist: {missing}"
    assert len(paths) >= 10


def test_doc_reference_check_can_fail() -> None:
    paths = referenced_paths("[gone](../deploy/kubernetes/nowhere.yaml) and `deploy/missing/`")

    assert {p.exists() for p in paths} == {False}
    assert len(paths) == 2
    assert missing_anchors("[x](operations.md#runbooks) [y](operations.md#no-such-part)") == [
        "operations.md#no-such-part"
    ]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def missing_anchors(text: str) -> list[str]:
    """Links to a part of a local page (``page.md#part``) whose heading does not exist."""
    missing = []
    for target, anchor in LINK.findall(text):
        if anchor and not re.match(r"^[a-z]+:", target):
            page = (DOC.parent / target).read_text()
            if anchor not in heading_anchors(page):
                missing.append(f"{target}#{anchor}")
    return missing


def test_doc_links_to_parts_that_exist() -> None:
    assert missing_anchors(DOC.read_text()) == []


def test_doc_names_every_pattern_directory() -> None:
    text = DOC.read_text()
    for directory in (*PATTERN_MODES, "tools"):
        assert f"deploy/kubernetes/{directory}/" in text, directory
