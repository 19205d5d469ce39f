"""The production profiles in deploy/: each ``dagster.yaml`` passes Dagster's instance schema, and
each class it names (storage, run launcher, compute log manager) accepts its part, down to the raw
ECS and Kubernetes API fields the launchers pass through unchecked. Nothing here connects to AWS,
Kubernetes or Postgres: the environment variables the files read are set to dummy values.

A misspelt key anywhere in a profile fails :func:`validate_profile`; ``test_a_misspelt_key_fails``
keeps that true for one key of every kind of section.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import yaml
from botocore.exceptions import ParamValidationError
from botocore.validate import validate_parameters
from dagster._config import process_config, resolve_to_config_type
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.ref import InstanceRef
from dagster._core.workspace.load import location_origins_from_yaml_paths
from dagster._serdes.config_class import ConfigurableClassData
from dagster_aws.ecs import EcsRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
from dagster_postgres.utils import pg_url_from_config
from kubernetes.client import V1Job
from sqlalchemy.engine import make_url

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
PROFILES = sorted(DEPLOY.glob("**/dagster.yaml"))
ECS, K8S = DEPLOY / "ecs" / "dagster.yaml", DEPLOY / "k8s" / "dagster.yaml"
WORKSPACE = DEPLOY / "workspace.yaml"


class DeployConfigError(Exception):
    """A deploy file that Dagster, or a class the file names, would reject."""


def env_names(value: object) -> set[str]:
    """The environment variables a YAML document reads with Dagster's ``{env: NAME}``."""
    if isinstance(value, dict):
        if set(value) == {"env"} and isinstance(value["env"], str):
            return {value["env"]}
        return set().union(*map(env_names, value.values()))
    if isinstance(value, list):
        return set().union(*map(env_names, value))
    return set()


def dummy_value(name: str) -> str:
    return "5432" if name.endswith("_PORT") else f"dummy-{name.lower().replace('_', '-')}"


@pytest.fixture
def deploy_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Every variable any deploy file reads, set to a dummy value."""
    names = set().union(*(env_names(yaml.safe_load(p.read_text())) for p in [*PROFILES, WORKSPACE]))
    values = {name: dummy_value(name) for name in sorted(names)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def validate_profile(path: Path) -> dict[str, Mapping[str, Any]]:
    """Load ``path`` the way every Dagster process loads its instance, then check each configured
    class's config against that class's own schema; returns the processed config by class name."""
    try:
        ref = InstanceRef.from_dir(str(path.parent), config_dir=str(path.parent), config_filename=path.name)
    except DagsterInvalidConfigError as err:
        raise DeployConfigError(str(err)) from err
    configs: dict[str, Mapping[str, Any]] = {}
    for data in ref._asdict().values():
        if not isinstance(data, ConfigurableClassData):
            continue
        klass = getattr(importlib.import_module(data.module_name), data.class_name)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        if not result.success:
            errors = "; ".join(error.message for error in result.errors or [])
            raise DeployConfigError(f"{data.class_name}: {errors}")
        assert result.value is not None
        configs[data.class_name] = result.value
        if data in (ref.run_launcher_data, ref.compute_logs_data):
            check_constructible(klass, result.value)
        CLASS_CHECKS.get(data.class_name, lambda _: None)(result.value)
    return configs


def check_constructible(klass: type, config: Mapping[str, Any]) -> None:
    """These classes are built as ``cls(inst_data=..., **config)``: the schema alone lets a
    constructor argument be missing (K8sRunLauncher's service_account_name is)."""
    try:
        inspect.signature(klass).bind(**config)
    except TypeError as err:
        raise DeployConfigError(f"{klass.__name__}: {err}") from err


def check_postgres(config: Mapping[str, Any]) -> None:
    """Exactly one of postgres_url / postgres_db, and a URL whose database driver is installed
    (SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; dagster-postgres brings psycopg2)."""
    url = make_url(pg_url_from_config(config))
    try:
        url.get_dialect().import_dbapi()
    except ImportError as err:
        raise DeployConfigError(
            f"Postgres storage: no driver for {url.drivername}:// (see postgres_db.scheme): {err}"
        ) from err


def check_ecs_launcher(config: Mapping[str, Any]) -> None:
    """``run_resources`` and ``run_task_kwargs`` are open mappings in the launcher's schema: check
    them against the keys it reads and against the ECS RunTask API model that botocore ships."""
    declared = EcsRunLauncher.config_type()["run_resources"].config_type.fields
    unknown = sorted(set(config.get("run_resources", {})) - set(declared))
    if unknown:
        raise DeployConfigError(
            f"EcsRunLauncher run_resources: unknown {unknown}, expected {sorted(declared)}"
        )
    kwargs = dict(config.get("run_task_kwargs", {}))
    reserved = sorted({"taskDefinition", "overrides"} & set(kwargs))
    if reserved:
        raise DeployConfigError(f"EcsRunLauncher run_task_kwargs: {reserved} are set by the launcher")
    shape = botocore.session.get_session().get_service_model("ecs").operation_model("RunTask").input_shape
    try:
        validate_parameters({**kwargs, "taskDefinition": "img2ds-check"}, shape)
    except ParamValidationError as err:
        raise DeployConfigError(f"EcsRunLauncher run_task_kwargs: {err}") from err


def k8s_run_job(config: Mapping[str, Any]) -> V1Job:
    """The Job K8sRunLauncher would submit for a run, built as its launch_run builds it (minus the
    run's own tags and the API call)."""
    context = K8sContainerContext(
        image_pull_policy=config.get("image_pull_policy"),
        image_pull_secrets=config.get("image_pull_secrets"),
        service_account_name=config.get("service_account_name"),
        env_config_maps=config.get("env_config_maps"),
        env_secrets=config.get("env_secrets"),
        env_vars=config.get("env_vars"),
        volume_mounts=config.get("volume_mounts"),
        volumes=config.get("volumes"),
        labels=config.get("labels"),
        namespace=config.get("job_namespace"),
        resources=config.get("resources"),
        scheduler_name=config.get("scheduler_name"),
        security_context=config.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config.get("run_k8s_config", {})),
    )
    job_config = DagsterK8sJobConfig(
        job_image=config.get("job_image"),
        dagster_home=config.get("dagster_home"),
        instance_config_map=config["instance_config_map"],
        postgres_password_secret=config.get("postgres_password_secret"),
    )
    return construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_run"],
        job_name="img2ds-config-check",
        user_defined_k8s_config=context.run_k8s_config,
        component="run_worker",
    )


def check_k8s_launcher(config: Mapping[str, Any]) -> None:
    """The raw Kubernetes parts (volumes, mounts, run_k8s_config) are open mappings in the schema;
    dagster_k8s checks them against the Kubernetes models when it builds the Job."""
    try:
        k8s_run_job(config)
    except Exception as err:  # dagster_k8s raises a bare Exception naming the unexpected keys
        raise DeployConfigError(f"K8sRunLauncher: {err}") from err


CLASS_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "PostgresStorage": check_postgres,
    "EcsRunLauncher": check_ecs_launcher,
    "K8sRunLauncher": check_k8s_launcher,
}


def test_both_profiles_are_there() -> None:
    assert PROFILES == [ECS, K8S]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.parent.name)
@pytest.mark.usefixtures("deploy_env")
def test_profile_is_valid(path: Path) -> None:
    configs = validate_profile(path)
    launcher = {ECS: "EcsRunLauncher", K8S: "K8sRunLauncher"}[path]
    assert {launcher, "PostgresStorage", "S3ComputeLogManager"} <= set(configs)
    url = pg_url_from_config(configs["PostgresStorage"])
    assert "dummy-dagster-pg-host:5432/dummy-dagster-pg-db" in url


def test_the_profiles_differ_only_in_the_launcher() -> None:
    ecs, k8s = (yaml.safe_load(p.read_text()) for p in (ECS, K8S))
    assert ecs["run_launcher"] != k8s["run_launcher"]
    assert {k: v for k, v in ecs.items() if k != "run_launcher"} == {
        k: v for k, v in k8s.items() if k != "run_launcher"
    }
    # Shard runs never take every run slot: staging a table and refreshing the stats still start.
    pools = ecs["concurrency"]["pools"]
    assert pools["default_limit"] < ecs["concurrency"]["runs"]["max_concurrent_runs"]


@pytest.mark.usefixtures("deploy_env")
def test_a_k8s_run_pod_gets_the_image_the_environment_and_the_data() -> None:
    config = validate_profile(K8S)["K8sRunLauncher"]
    job = k8s_run_job(config)
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "dummy-img2ds-image"
    assert pod.service_account_name == "img2ds-run"
    assert job.spec.backoff_limit == 0
    # The password the storage block reads from DAGSTER_PG_PASSWORD comes from the Secret.
    password = next(e for e in container.env if e.name == "DAGSTER_PG_PASSWORD")
    assert password.value_from.secret_key_ref.name == "img2ds-postgres"
    assert [ref.config_map_ref.name for ref in container.env_from if ref.config_map_ref] == ["img2ds-env"]
    assert [m.mount_path for m in container.volume_mounts] == ["/data"]


@pytest.mark.usefixtures("deploy_env")
def test_the_workspace_names_the_code_location() -> None:
    (origin,) = location_origins_from_yaml_paths([str(WORKSPACE)])
    local = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert origin.location_name == local["location_name"]
    assert (origin.host, origin.port) == ("dummy-img2ds-code-server-host", 4000)  # type: ignore[attr-defined]


def test_every_environment_variable_is_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    names = set().union(*(env_names(yaml.safe_load(p.read_text())) for p in [*PROFILES, WORKSPACE]))
    assert names
    assert sorted(n for n in names if f"`{n}`" not in readme) == []


# (profile, path to a key, its misspelling; None: the key left out)
MISSPELLINGS: list[tuple[Path, tuple[str | int, ...], str | None]] = [
    (ECS, ("storage", "custom", "config", "postgres_db", "hostname"), "host"),
    (ECS, ("storage", "custom", "config", "postgres_db", "scheme"), None),
    (ECS, ("concurrency", "pools", "default_limit"), "default_limt"),
    (ECS, ("run_monitoring", "start_timeout_seconds"), "start_timeout"),
    (ECS, ("run_launcher", "config", "use_current_ecs_task_config"), "use_current_task_config"),
    (ECS, ("run_launcher", "config", "run_resources", "memory"), "memroy"),
    (
        ECS,
        ("run_launcher", "config", "run_task_kwargs", "capacityProviderStrategy", 0, "capacityProvider"),
        "capacityprovider",
    ),
    (ECS, ("compute_logs", "config", "upload_interval"), "upload_intervals"),
    (K8S, ("run_launcher", "config", "job_namespace"), "namespace"),
    (K8S, ("run_launcher", "config", "service_account_name"), None),
    (K8S, ("run_launcher", "config", "volume_mounts", 0, "mount_path"), "mountpath"),
    (K8S, ("run_launcher", "config", "volumes", 0, "persistentVolumeClaim", "claimName"), "claim"),
    (
        K8S,
        ("run_launcher", "config", "run_k8s_config", "job_spec_config", "ttl_seconds_after_finished"),
        "ttl_after_finished",
    ),
]


@pytest.mark.parametrize(
    ("profile", "key_path", "wrong"),
    MISSPELLINGS,
    ids=[f"{p.parent.name}-{k[-1]}" for p, k, _ in MISSPELLINGS],
)
@pytest.mark.usefixtures("deploy_env")
def test_a_misspelt_key_fails(
    tmp_path: Path, profile: Path, key_path: tuple[str | int, ...], wrong: str | None
) -> None:
    doc = copy.deepcopy(yaml.safe_load(profile.read_text()))
    *parents, key = key_path
    node = doc
    for step in parents:
        node = node[step]
    value = node.pop(key)
    if wrong is not None:
        node[wrong] = value
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(DeployConfigError, match=re.escape(str(wrong or key))):
        validate_profile(tmp_path / "dagster.yaml")
