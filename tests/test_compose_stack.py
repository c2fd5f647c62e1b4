"""The docker-compose stack (app, OpenTelemetry Collector, Jaeger, Prometheus), checked without Docker.

There is no Docker engine where the tests run, so these tests read docker-compose.yml, the configs in
collector-config/ and the Dockerfile, and check that they fit together the way ``docker compose up``
needs: pinned images, ports on the loopback only, collector pipelines whose every component is defined
and used, every endpoint naming a compose service and a port that service listens on, a start order
without cycles, and an app image whose command runs a module of this repository. The app itself is
tested over real OTLP/HTTP in tests/test_otlp_end_to_end.py.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
COLLECTOR_CONFIG = REPO / "collector-config" / "otel-collector.yaml"
TAIL_SAMPLING_CONFIG = REPO / "collector-config" / "otel-collector.tail-sampling.yaml"
JAEGER_CONFIG = REPO / "collector-config" / "jaeger.yaml"
PROMETHEUS_CONFIG = REPO / "collector-config" / "prometheus.yml"
RULES = REPO / "collector-config" / "background-tasks.rules.yml"
BUILD_SCRIPT = REPO / "stack" / "build-stack.sh"

# Ports an image listens on without a config of ours saying so. The collector's and Jaeger's ports
# come from their configs (below), the app's from the Dockerfile.
IMAGE_DEFAULT_PORTS = {"prom/prometheus": {9090}}
# Where an image reads its config file when the command does not say (--config=...).
IMAGE_DEFAULT_CONFIG = {"prom/prometheus": "/etc/prometheus/prometheus.yml"}
# Images without a shell or any HTTP client: compose cannot run a health check inside them.
DISTROLESS_IMAGES = {"otel/opentelemetry-collector-contrib"}
# Images that read a config in the OpenTelemetry Collector format.
COLLECTOR_IMAGES = {"otel/opentelemetry-collector-contrib", "jaegertracing/jaeger"}
# The sections of an OpenTelemetry Collector config that a pipeline refers to.
PIPELINE_SECTIONS = ("receivers", "processors", "exporters")


def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return yaml.safe_load(path.read_text())


@cache
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"no service {name!r} in docker-compose.yml"
    return services()[name]


def image_repository(image: str) -> str:
    """``prom/prometheus:v3.12.0`` -> ``prom/prometheus`` (a registry port's colon is not a tag)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def assert_pinned(image: str, where: str) -> None:
    tag = image_tag(image)
    assert tag is not None, f"{where}: {image} has no tag"
    assert tag != "latest", f"{where}: {image} is not pinned"
    # A release, not a moving tag such as "stable", "main" or "3": at least major.minor.
    assert re.search(r"\d+\.\d+", tag), f"{where}: {image}'s tag {tag!r} names no version"


def command_args(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command", [])
    return command.split() if isinstance(command, str) else [str(arg) for arg in command]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition, for both the list and the mapping syntax."""
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(svc: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """(host ip, host port, container port) of every short-syntax ``ports`` entry."""
    for entry in svc.get("ports", []):
        assert isinstance(entry, str), f"use the short syntax, quoted: {entry!r}"
        parts = entry.split("/", 1)[0].split(":")
        assert len(parts) == 3, f"{entry!r}: give the host address, host port and container port"
        host, host_port, container_port = parts
        yield host, int(host_port), int(container_port)


def mounts(svc: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """Container path -> (repository file, read-only) of every bind mount of a repository file."""
    result = {}
    for volume in svc.get("volumes", []):
        source, target, *options = str(volume).split(":")
        assert source.startswith("./"), f"{volume!r}: mount files of this repository, relative to it"
        result[target] = (REPO / source, "ro" in options)
    return result


def config_files(name: str) -> list[Path]:
    """The repository files that service ``name`` reads as its config (its ``--config=``s or the image's default)."""
    svc = service(name)
    paths = [arg.split("=", 1)[1] for arg in command_args(svc) if arg.startswith("--config=")]
    if not paths:
        paths = [IMAGE_DEFAULT_CONFIG[image_repository(svc["image"])]]
    mounted = mounts(svc)
    for path in paths:
        assert path in mounted, f"{name} reads {path}, which is not mounted"
    return [mounted[path][0] for path in paths]


def config_file(name: str) -> Path:
    """The one repository file that service ``name`` reads as its config."""
    (path,) = config_files(name)
    return path


def merged(base: Any, overlay: Any) -> Any:
    """Two collector configs as the collector merges its ``--config`` files: maps join, anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {key: merged(base[key], overlay[key]) if key in overlay else base[key] for key in base} | {
            key: value for key, value in overlay.items() if key not in base
        }
    return overlay


def host_port(endpoint: str) -> tuple[str, int]:
    """``0.0.0.0:4317``, ``jaeger:4317`` or ``http://prometheus:9090`` -> (host, port)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    assert parts.port is not None, f"{endpoint!r} has no port"
    return parts.hostname or "", parts.port


def collector_configs() -> dict[str, Any]:
    """The configs in the OpenTelemetry Collector format, by service: the collectors' (merged) and Jaeger v2's."""
    configs = {}
    for name, svc in services().items():
        if "image" in svc and image_repository(svc["image"]) in COLLECTOR_IMAGES:
            files = [load_yaml(path) for path in config_files(name)]
            configs[name] = functools.reduce(merged, files)
    return configs


def component_endpoints(config: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(section, component id, endpoint) of every ``endpoint`` a component (or a receiver protocol) sets."""
    for section in ("receivers", "exporters", "extensions"):
        for component, settings in (config.get(section) or {}).items():
            settings = settings or {}
            if "endpoint" in settings:
                yield section, component, settings["endpoint"]
            for protocol in (settings.get("protocols") or {}).values():
                if protocol and "endpoint" in protocol:
                    yield section, component, protocol["endpoint"]
            # Jaeger's query extension: http.endpoint (UI and API) and grpc.endpoint.
            for server in ("http", "grpc"):
                if isinstance(settings.get(server), dict) and "endpoint" in settings[server]:
                    yield section, component, settings[server]["endpoint"]


def listening_ports(name: str) -> set[int]:
    """The ports service ``name`` listens on inside the compose network."""
    svc = service(name)
    if "build" in svc:
        return {dockerfile_port()}
    if name in collector_configs():
        config = collector_configs()[name]
        ports = set()
        for section, component, endpoint in component_endpoints(config):
            host, port = host_port(endpoint)
            # Receivers and extensions listen; an exporter listens when it binds (prometheus), not when it sends.
            if section != "exporters" or host in ("0.0.0.0", ""):
                assert host in ("0.0.0.0", ""), f"{name}: {component} listens on {endpoint}, unreachable from others"
                ports.add(port)
        return ports
    return IMAGE_DEFAULT_PORTS[image_repository(svc["image"])]


# -- Dockerfile -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    assert DOCKERFILE.is_file(), "the Dockerfile is missing"
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile_instructions() if instruction == keyword]


def dockerfile_cmd() -> list[str]:
    (cmd,) = dockerfile("CMD")
    args = json.loads(cmd)  # the exec form: the server is PID 1 and gets the stop signal itself
    assert isinstance(args, list)
    return [str(arg) for arg in args]


def dockerfile_port() -> int:
    cmd = dockerfile_cmd()
    return int(cmd[cmd.index("--port") + 1])


# -- The tests --------------------------------------------------------------------------------------


def test_every_image_is_pinned() -> None:
    for name, svc in services().items():
        assert ("image" in svc) != ("build" in svc), f"{name}: either a pinned image or a build"
        if "image" in svc:
            assert_pinned(svc["image"], name)
    (base,) = dockerfile("FROM")
    assert_pinned(base.split()[0], "Dockerfile")


def test_every_published_port_is_on_the_loopback_only() -> None:
    published = 0
    for name, svc in services().items():
        listening = listening_ports(name)
        for host, _, container_port in published_ports(svc):
            published += 1
            assert host == "127.0.0.1", f"{name} publishes {container_port} on {host}, not only 127.0.0.1"
            assert container_port in listening, f"{name} publishes {container_port}, but listens on {listening}"
    assert published > 0
    # What the README of the stack promises: the Jaeger UI and the app on the host.
    assert (("127.0.0.1", 16686, 16686)) in published_ports(service("jaeger"))
    assert (("127.0.0.1", 8000, dockerfile_port())) in published_ports(service("app"))


@pytest.mark.parametrize("name", ["otel-collector", "otel-collector-tail-sampling", "jaeger"])
def test_pipelines_use_only_defined_components_and_every_defined_one(name: str) -> None:
    config = collector_configs()[name]
    pipelines = config["service"]["pipelines"]
    connectors = set(config.get("connectors") or {})
    used: dict[str, set[str]] = {section: set() for section in PIPELINE_SECTIONS}
    for pipeline_id, pipeline in pipelines.items():
        assert pipeline_id.split("/", 1)[0] in ("traces", "metrics", "logs"), pipeline_id
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{name}: {pipeline_id} is not a pipeline"
        for section in PIPELINE_SECTIONS:
            for component in pipeline.get(section, []):
                defined = set(config.get(section) or {})
                if section != "processors":
                    defined |= connectors
                assert component in defined, f"{name}: {pipeline_id} uses {component}, not defined in {section}"
                used[section].add(component)
    for section in PIPELINE_SECTIONS:
        unused = set(config.get(section) or {}) - used[section]
        assert not unused, f"{name}: {section} {sorted(unused)} are defined but in no pipeline"
    # A connector is an exporter of one pipeline and a receiver of another.
    for connector in connectors:
        assert connector in used["exporters"] and connector in used["receivers"], f"{name}: connector {connector}"
    # Extensions: defined ones enabled, enabled ones defined.
    assert set(config["service"].get("extensions", [])) == set(config.get("extensions") or {}), name
    # A processor that protects the collector's memory comes first wherever it is used.
    for pipeline in pipelines.values():
        processors = pipeline.get("processors", [])
        if "memory_limiter" in processors:
            assert processors[0] == "memory_limiter"


def test_collector_pipelines() -> None:
    config = collector_configs()["otel-collector"]
    pipelines = config["service"]["pipelines"]
    traces = pipelines["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"] == ["memory_limiter", "batch"]
    assert {"otlp/jaeger", "debug", "spanmetrics"} <= set(traces["exporters"])
    assert config["exporters"]["debug"]["verbosity"] == "basic"
    assert config["exporters"]["otlp/jaeger"]["tls"]["insecure"] is True
    limiter = config["processors"]["memory_limiter"]
    assert {"check_interval", "limit_mib", "spike_limit_mib"} <= set(limiter)
    assert limiter["spike_limit_mib"] < limiter["limit_mib"]
    # The app's own metrics, received over OTLP, go to Prometheus too.
    assert any(
        pipeline_id.startswith("metrics") and "otlp" in p["receivers"] and "prometheus" in p["exporters"]
        for pipeline_id, p in pipelines.items()
    )
    assert "health_check" in config["service"]["extensions"]


def test_spanmetrics_turns_traces_into_prometheus_metrics() -> None:
    config = collector_configs()["otel-collector"]
    pipelines = config["service"]["pipelines"]
    assert "spanmetrics" in config["connectors"]
    into = [pid for pid, p in pipelines.items() if pid.startswith("traces") and "spanmetrics" in p["exporters"]]
    out_of = [pid for pid, p in pipelines.items() if pid.startswith("metrics") and "spanmetrics" in p["receivers"]]
    assert into and out_of, "spanmetrics must be an exporter of a traces pipeline and a receiver of a metrics one"
    assert all("prometheus" in pipelines[pid]["exporters"] for pid in out_of)
    # A dimension per attribute otel_bgtasks puts on every task span, so the metrics tell tasks apart.
    dimensions = {d["name"] for d in config["connectors"]["spanmetrics"]["dimensions"]}
    assert {"background_task.outcome", "background_task.execution", "code.function.name"} <= dimensions


def test_jaeger_monitor_tab_reads_what_the_collector_produces() -> None:
    collector = collector_configs()["otel-collector"]
    jaeger = collector_configs()["jaeger"]
    query = jaeger["extensions"]["jaeger_query"]["storage"]
    storage = jaeger["extensions"]["jaeger_storage"]
    assert query["traces"] in storage["backends"]
    assert jaeger["exporters"]["jaeger_storage_exporter"]["trace_storage"] in storage["backends"]
    prometheus = storage["metric_backends"][query["metrics"]]["prometheus"]
    host, port = host_port(prometheus["endpoint"])
    assert port in listening_ports(host)
    assert image_repository(service(host)["image"]) == "prom/prometheus"
    # Jaeger queries <namespace>_calls_total and <namespace>_duration_<unit>_bucket: the names the
    # collector's prometheus exporter gives the connector's metrics.
    spanmetrics = collector["connectors"]["spanmetrics"]
    assert prometheus["metric_namespace"] == spanmetrics["namespace"].replace(".", "_")
    assert prometheus["latency_unit"] == spanmetrics["histogram"]["unit"]
    assert prometheus["normalize_calls"] is True and prometheus["normalize_duration"] is True


def test_collector_exporters_reach_compose_services() -> None:
    checked = 0
    for name, config in collector_configs().items():
        for section, component, endpoint in component_endpoints(config):
            host, port = host_port(endpoint)
            if section != "exporters" or host in ("0.0.0.0", ""):
                continue  # a listener, counted in listening_ports()
            checked += 1
            assert host in services(), f"{name}: {component} sends to {host}, not a compose service"
            assert port in listening_ports(host), f"{name}: {component} sends to {host}:{port}, which is closed"
    assert checked > 0
    assert host_port(collector_configs()["otel-collector"]["exporters"]["otlp/jaeger"]["endpoint"]) == (
        "jaeger",
        4317,
    )


def test_prometheus_scrapes_compose_services() -> None:
    config = load_yaml(config_file("prometheus"))
    assert config_file("prometheus") == PROMETHEUS_CONFIG
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    for target in targets:
        host, port = host_port(target)
        assert host in services(), f"Prometheus scrapes {target}: {host} is not a compose service"
        assert port in listening_ports(host), f"Prometheus scrapes {target}, which is closed"
    # It scrapes the collector's prometheus exporter.
    exporter_port = host_port(collector_configs()["otel-collector"]["exporters"]["prometheus"]["endpoint"])[1]
    assert f"otel-collector:{exporter_port}" in targets


def test_prometheus_loads_the_background_task_rules() -> None:
    config = load_yaml(config_file("prometheus"))
    mounted = mounts(service("prometheus"))
    assert config.get("rule_files"), "prometheus.yml loads no rules"
    for path in config["rule_files"]:
        assert path in mounted, f"Prometheus loads {path}, which is not mounted"
    assert RULES in {mounted[path][0] for path in config["rule_files"]}
    # The collector's exporter sets job and instance from service.name and service.instance.id, and
    # the rules group by job: the scrape keeps them instead of renaming them exported_job/exported_instance.
    exporter_port = host_port(collector_configs()["otel-collector"]["exporters"]["prometheus"]["endpoint"])[1]
    (collector_job,) = (
        job
        for job in config["scrape_configs"]
        if f"otel-collector:{exporter_port}" in [t for sc in job["static_configs"] for t in sc["targets"]]
    )
    assert collector_job.get("honor_labels") is True


def test_app_is_configured_only_through_otel_variables_and_exports_to_the_collector() -> None:
    env = environment(service("app"))
    assert all(key.startswith("OTEL_") for key in env), sorted(env)
    assert env["OTEL_SERVICE_NAME"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_METRICS_EXPORTER"] == "otlp"
    assert env["OTEL_LOGS_EXPORTER"] == "none"
    host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otel-collector"
    # The port of the collector's OTLP receiver for the protocol the app speaks.
    protocol = {"http/protobuf": "http", "http/json": "http", "grpc": "grpc"}[env["OTEL_EXPORTER_OTLP_PROTOCOL"]]
    receiver = collector_configs()["otel-collector"]["receivers"]["otlp"]["protocols"][protocol]
    assert host_port(receiver["endpoint"])[1] == port
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")  # the collector's receiver has no TLS


def test_start_order_jaeger_then_collector_then_app() -> None:
    graph = {name: depends_on(svc) for name, svc in services().items()}
    for name, deps in graph.items():
        for dep, condition in deps.items():
            assert dep in graph, f"{name} depends on {dep}, which is no service"
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in service(dep), f"{name} waits for {dep} to be healthy; it has no healthcheck"
    # No cycle: a topological order exists.
    order: list[str] = []
    remaining = dict(graph)
    while remaining:
        ready = [name for name, deps in remaining.items() if set(deps) <= set(order)]
        assert ready, f"depends_on has a cycle among {sorted(remaining)}"
        order.extend(sorted(ready))
        for name in ready:
            del remaining[name]
    assert "otel-collector" in graph["app"]
    assert "jaeger" in graph["otel-collector"]
    assert order.index("jaeger") < order.index("otel-collector") < order.index("app")


def test_health_checks_where_the_image_allows_one() -> None:
    for name, svc in services().items():
        distroless = "image" in svc and image_repository(svc["image"]) in DISTROLESS_IMAGES
        if distroless:
            # No shell, no client to probe with: the collector's own health_check extension instead.
            assert "healthcheck" not in svc, f"{name}'s image cannot run a health check"
            config = collector_configs()[name]
            assert "health_check" in config["service"]["extensions"]
            _, port = host_port(config["extensions"]["health_check"]["endpoint"])
            assert port in [container_port for host, _, container_port in published_ports(svc) if host == "127.0.0.1"]
            continue
        check = svc.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] == "CMD", f"{name}: exec form, no shell needed"
        # http://127.0.0.1:PORT/... or ('127.0.0.1', PORT)
        probe = " ".join(check["test"])
        pattern = r"127\.0\.0\.1:(\d+)|'127\.0\.0\.1',\s*(\d+)"
        probed = {int(port) for ports in re.findall(pattern, probe) for port in ports if port}
        assert probed and probed <= listening_ports(name), f"{name} probes {probed}, listens on {listening_ports(name)}"


def test_configs_are_mounted_read_only_from_the_repository() -> None:
    assert config_file("otel-collector") == COLLECTOR_CONFIG
    assert config_file("jaeger") == JAEGER_CONFIG
    for name, svc in services().items():
        for target, (source, read_only) in mounts(svc).items():
            assert source.is_file(), f"{name} mounts {source.relative_to(REPO)}, which does not exist"
            assert read_only, f"{name} mounts {target} writable"


def test_dockerfile_runs_the_example_app_of_this_repository() -> None:
    (base,) = dockerfile("FROM")
    image = base.split()[0]
    assert image_repository(image) == "python"
    version = re.match(r"(\d+\.\d+(?:\.\d+)?)", image_tag(image) or "")
    assert version, image
    requires = re.search(r'^requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert requires, "pyproject.toml has no requires-python"
    assert version.group(1) in SpecifierSet(requires.group(1)), f"{image} does not satisfy {requires.group(0)}"

    cmd = dockerfile_cmd()
    assert cmd[:2] == ["opentelemetry-instrument", "uvicorn"], cmd
    module, _, attribute = cmd[2].partition(":")
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"the image runs {module}, which is not in the repository"
    tree = ast.parse(path.read_text())
    names = [target for node in ast.walk(tree) if isinstance(node, ast.Assign) for target in node.targets]
    assigned = {name.id for name in names if isinstance(name, ast.Name)}
    assert attribute in assigned, f"{module} defines no {attribute}"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # reachable from the other containers and the host port
    # uvicorn flushes nothing on a re-raised SIGTERM; see the Dockerfile and tests/test_otlp_end_to_end.py.
    assert dockerfile("STOPSIGNAL") == ["SIGINT"]
    assert any("opentelemetry-distro" in run for run in dockerfile("RUN"))


def test_docker_build_context_has_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip().rstrip("/") for p in ignore if p.strip() and not p.startswith("#")]
    assert ".git" in patterns and ".venv" in patterns
    copied = [arg for copy in dockerfile("COPY") for arg in copy.split()[:-1] if not arg.startswith("--")]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), f".dockerignore leaves {source} out"


def built_release(variable: str) -> str:
    """A release stack/build-stack.sh builds (``OTELCOL_VERSION=0.139.0``): what CI runs without Docker."""
    found = re.search(rf"^{variable}=(\S+)", BUILD_SCRIPT.read_text(), re.MULTILINE)
    assert found is not None, f"stack/build-stack.sh sets no {variable}"
    return found.group(1)


def test_images_are_the_releases_ci_runs() -> None:
    # tests/test_real_stack.py runs what stack/build-stack.sh builds, and checks the Prometheus it runs
    # against the prom/prometheus pin.
    collectors = [svc["image"] for svc in services().values() if "opentelemetry-collector" in svc.get("image", "")]
    assert collectors and {image_tag(image) for image in collectors} == {built_release("OTELCOL_VERSION")}
    assert image_tag(service("jaeger")["image"]) == built_release("JAEGER_VERSION")
    assert built_release("OTELCOL_VERSION") == "0.139.0"  # the release whose OTLP gRPC exporter is "otlp"


def test_tail_sampling_profile_samples_what_goes_to_jaeger_only() -> None:
    svc = service("otel-collector-tail-sampling")
    assert svc["profiles"] == ["tail-sampling"]
    assert svc["image"] == service("otel-collector")["image"]
    assert config_files("otel-collector-tail-sampling") == [COLLECTOR_CONFIG, TAIL_SAMPLING_CONFIG]
    config = collector_configs()["otel-collector-tail-sampling"]
    pipelines = config["service"]["pipelines"]
    to_jaeger = [p for p in pipelines.values() if "otlp/jaeger" in p["exporters"]]
    assert [p["processors"] for p in to_jaeger] == [["memory_limiter", "tail_sampling", "batch"]]
    # The span metrics (Jaeger's Monitor tab) still count every span: no sampler before the connector.
    (to_metrics,) = [p for p in pipelines.values() if "spanmetrics" in p["exporters"]]
    assert "tail_sampling" not in to_metrics["processors"] and to_metrics["receivers"] == ["otlp"]
    policies = {p["name"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert list(policies) == ["task-not-successful", "task-blocked-the-event-loop", "task-slow", "the-rest"]
    assert "background_task.outcome" in policies["task-not-successful"]["ottl_condition"]["span"][0]
    events = policies["task-blocked-the-event-loop"]["ottl_condition"]["spanevent"]
    assert events == ['name == "background_task.event_loop_blocked"']
    # Every variable the file reads has its value in the profile's service (the file has defaults too).
    variables = set(re.findall(r"\$\{env:(\w+):-", TAIL_SAMPLING_CONFIG.read_text()))
    assert variables == set(environment(svc))
    assert variables == {"TAIL_SAMPLING_PERCENTAGE", "TAIL_SAMPLING_DECISION_WAIT", "TAIL_SAMPLING_SLOW_TASK_MS"}
