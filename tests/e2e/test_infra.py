"""The deployment files under infra/: they parse, name real commands and config keys, hold no
secrets, and keep the TensorRT-LLM container's own packages (fast; no network, no cluster)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from qvl_batch.cli import build_parser
from qvl_batch.run.validate import load_job

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
INFRA_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())
YAML_FILES = sorted(p for p in INFRA_FILES if p.suffix in (".yaml", ".yml"))
KUBE_FILES = [p for p in YAML_FILES if "jobs" not in p.relative_to(INFRA).parts]
IMAGE_ROOT = "/app/"  # the Dockerfile's WORKDIR: the repo is copied there


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(kind: str) -> dict:
    found = [d for p in KUBE_FILES for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under infra/, found {len(found)}"
    return found[0]


def _subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "command":
            return set(action.choices)
    raise AssertionError("qvl-batch parser has no subcommands")


def test_infra_has_the_expected_files():
    names = {str(p.relative_to(INFRA)) for p in INFRA_FILES}
    expected = {
        "Dockerfile",
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "schedule/nightly-cronjob.yaml",
    }
    assert expected <= names, f"missing: {expected - names}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses_and_starts_with_a_usage_comment(path):
    docs = _docs(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(d, dict) for d in docs)
    assert path.read_text().startswith("#"), f"{path} needs a top comment saying how to use it"


def test_dockerfile_starts_with_a_usage_comment():
    assert (INFRA / "Dockerfile").read_text().startswith("#")


def _gpu_worker_groups(cluster_spec: dict) -> list[dict]:
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                groups.append(group)
    return groups


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", "the head must not offer GPUs"
    gpu_groups = _gpu_worker_groups(spec)
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in gpu_groups]:
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, "pods need a memory-backed /dev/shm"
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in {v["name"] for v in shm}
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            assert refs, f"{container['name']} gets no credentials from a Secret"


def test_raycluster_kind_and_gpu_workers():
    cluster = _one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])


def test_rayjob_kind_cluster_and_lifecycle():
    job = _one("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    _check_cluster_spec(spec["rayClusterSpec"])


def test_cronjob_creates_the_rayjob_without_overlap():
    cron = _one("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    script = " ".join(
        " ".join(c.get("command", []) + c.get("args", []))
        for c in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    )
    assert "kubectl create -f" in script and "rayjob.yaml" in script
    # Every placeholder of the RayJob is filled in by the scheduler's sed.
    placeholders = set(re.findall(r"\b[A-Z]+_DATE\b", (INFRA / "kuberay/rayjob.yaml").read_text()))
    assert placeholders == {"RUN_DATE", "PREV_DATE"}, placeholders
    for name in placeholders:
        assert re.search(rf"s/{name}/\$\w+/g", script), f"the CronJob does not fill in {name}"


def test_nightly_run_reuses_the_previous_days_output_when_there_is_one():
    parsed = build_parser().parse_args(["run", *_entrypoint_args()])
    cfg = load_job(REPO / parsed.job[len(IMAGE_ROOT) :], parsed.overrides)
    today = cfg.output.path.replace("RUN_DATE", "")
    assert [u.replace("PREV_DATE", "") for u in cfg.reuse.outputs] == [today]
    assert cfg.reuse.if_missing == "skip", "a first night has no earlier output"


def _entrypoint_args() -> list[str]:
    args = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    assert args[:2] == ["qvl-batch", "run"], args
    return args[2:]


def test_rayjob_entrypoint_uses_real_cli_and_config_keys():
    args = _entrypoint_args()
    parsed = build_parser().parse_args(["run", *args])
    assert parsed.no_progress
    job_file = parsed.job
    assert job_file.startswith(IMAGE_ROOT), job_file
    local = REPO / job_file[len(IMAGE_ROOT) :]
    assert local.is_file(), f"{job_file}: no {local} in the repo to copy into the image"
    copied = re.findall(r"^COPY\s+(.+?)\s+(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert any(job_file.startswith(dst.rstrip("/") + "/") for _, dst in copied), job_file
    cfg = load_job(local, parsed.overrides)  # raises ConfigError on an unknown key or value
    assert cfg.cluster.address == "auto"
    assert cfg.engine.name == "trtllm"
    assert cfg.output.path and cfg.input.paths
    assert cfg.output.mode == "resume", "a rerun must resume the same output path"


def test_every_mentioned_subcommand_is_real():
    known = _subcommands()
    mentioned = {}
    for path in INFRA_FILES:
        for word in re.findall(r"qvl-batch[ \t]+([a-z][\w-]*)", path.read_text()):
            mentioned.setdefault(word, path)
    assert {"run", "doctor", "status", "verify"} <= set(mentioned), sorted(mentioned)
    unknown = {w: str(p) for w, p in mentioned.items() if w not in known}
    assert not unknown, f"not qvl-batch subcommands: {unknown}"


SECTIONS = (
    "job|input|prompt|image|batching|engine|sampling|structured|reuse|output|storage|cluster|limits"
)


def test_every_override_mentioned_is_a_real_config_key():
    overrides = set()
    for path in INFRA_FILES:
        for line in path.read_text().splitlines():
            for match in re.finditer(rf"(?<![\w./-])(?:{SECTIONS})\.[\w.]+=[^\s`)]+", line):
                overrides.add(match.group(0))
    assert len(overrides) >= 5, sorted(overrides)
    for item in sorted(overrides):
        # RUN_DATE and quotes are shell/CronJob text; the key and value shape is what matters.
        item = item.replace("'", "").rstrip("\\.")
        base = ["input.paths=[x]", "output.path=y"]
        load_job(None, [*base, item])


def test_dockerfile_uses_trtllm_container_and_constraints():
    text = (INFRA / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("nvcr.io/nvidia/tensorrt-llm/") for f in froms), froms
    assert re.search(r"^ARG\s+TRTLLM_TAG=", text, re.M)
    freeze = re.search(r"pip (?:freeze|list --format=freeze)\s*>\s*(\S+)", text)
    assert freeze, "the container's packages must be frozen into a constraints file"
    installs = re.findall(r"pip install ([^\n\\]+)", text)
    assert installs and all(f"-c {freeze.group(1)}" in i for i in installs), installs
    assert re.search(r"^RUN qvl-batch doctor", text, re.M)
    assert not re.search(r"^ENTRYPOINT", text, re.M)
    for src, _ in re.findall(r"^COPY\s+(.+?)\s+(\S+)$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"COPY {part}: not in the repo"


LITERAL_SECRETS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*(?![\"']?\$)\S", re.I),
    re.compile(r"aws_access_key_id\s*[:=]\s*(?![\"']?\$)\S", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_secrets(path):
    text = path.read_text()
    for pattern in LITERAL_SECRETS:
        assert not pattern.search(text), f"{path}: literal secret ({pattern.pattern})"


def _walk_env(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for value in node.values():
            yield from _walk_env(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_env(value)


def test_manifests_hold_no_secret_values():
    for path in KUBE_FILES:
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{path}: create the Secret with kubectl instead"
            for env in _walk_env(doc):
                if re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                    assert "value" not in env, f"{path}: {env['name']} has a literal value"
