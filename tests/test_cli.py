"""The ``tangram`` command line: every option is checked as a usage error (exit status 2,
the message on stderr, nothing on stdout, no traceback), ``--version``, ``-h``
everywhere, ``tangram config check|schema`` and ``tangram status`` against a real
server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from typer.testing import CliRunner

import tangram
from tangram.cli import app, config_schema_document, format_status
from tangram.config import default_config, parse_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def assert_usage_error(res: Any, message: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == "", res.stdout  # nothing printed before the error
    flat = " ".join(res.stderr.replace("│", " ").split())
    assert message in flat, res.stderr
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception


# ---- usage errors ------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("files")
    (d / "a-file").write_text("x\n")
    return {"FILE": str(d / "a-file"), "DIR": str(d), "MISSING": str(d / "missing")}


USAGE_ERRORS: list[tuple[list[str], str]] = [
    # serve
    (["serve", "--port", "99999"], "'--port': Input should be less than or equal to 65535"),
    (["serve", "--port", "-1"], "'--port': Input should be greater than or equal to 0"),
    (["serve", "--port", "http"], "'--port'"),
    (["serve", "--log-level", "verbose"], "'verbose' is not one of 'critical'"),
    (["serve", "--durability", "fast", "--data-dir", "{DIR}"], "'fast' is not one of"),
    (["serve", "--durability", "full"], "'--durability': needs --data-dir"),
    (["serve", "--host", "bad host!"], "'--host': 'bad host!' is neither an IP address"),
    (["serve", "--host", ""], "'--host'"),
    (["serve", "--config", "{MISSING}"], "'--config': file"),
    (["serve", "--config", "{DIR}"], "is a directory"),
    (["serve", "--data-dir", "{FILE}"], "'--data-dir': dir"),
    (["serve", "--nope"], "No such option: --nope"),
    # bench sim / replay / sweep / matrix / live
    (["bench", "sim", "-b", "0"], "'--batch' / '-b': Input should be greater than or equal to 1"),
    (["bench", "sim", "-b", "-5"], "'--batch' / '-b'"),
    (["bench", "sim", "--seed", "-1"], "'--seed'"),
    (["bench", "sim", "--capacity", "0"], "'--capacity'"),
    (["bench", "sim", "--steps", "0"], "'--steps' / '-s'"),
    (["bench", "sim", "--duration-error", "nan"], "'--duration-error'"),
    (["bench", "sim", "--duration-error", "inf"], "inf is not a finite number"),
    (["bench", "sim", "--duration-error", "-1"], "'--duration-error'"),
    (["bench", "sim", "-w", "nope"], "unknown workload 'nope'"),
    (["bench", "sim", "-p", "fastest"], "unknown policy 'fastest'"),
    (["bench", "sim", "-p", "min", "--ref", "tangram"], "--ref 'tangram' is not one of"),
    (["bench", "sim", "--pool", "cpu"], "give --capacity too"),
    (["bench", "sim", "--pool", "nope", "--capacity", "8"], "pool 'nope'"),
    (["bench", "sim", "--hide-durations", "--duration-error", "0.5"], "--hide-durations"),
    (["bench", "sim", "-c", "{MISSING}"], "'--config' / '-c': file"),
    (["bench", "sim", "-o", "{FILE}"], "'--out' / '-o': dir"),
    (["bench", "sim", "--save-trace", "{DIR}"], "'--save-trace'"),
    (["bench", "sim", "--save-trace", "{MISSING}/t.jsonl"], "no directory"),
    (["bench", "sim", "--out", "{FILE}/out"], "is not a directory this user can write"),
    (["bench", "matrix", "--out", "{FILE}/out"], "is not a directory this user can write"),
    (["bench", "replay", "{MISSING}"], "'TRACE': file"),
    (["bench", "replay", "{FILE}", "--capacity", "-2"], "'--capacity'"),
    (["bench", "sweep", "--vary", "speed"], "batch or capacity"),
    (["bench", "sweep", "--vary", "batch", "-b", "8"], "with --vary batch the batches are"),
    (["bench", "sweep", "--values", "0"], "--values needs at least one positive number"),
    (["bench", "sweep", "--values", "a,b"], "write whole numbers"),
    (["bench", "sweep", "-b", "0", "--vary", "capacity"], "'--batch' / '-b'"),
    (["bench", "matrix", "--tolerance", "inf"], "'--tolerance': inf is not a finite number"),
    (["bench", "matrix", "--seeds", "-1"], "--seeds '-1'"),
    (["bench", "matrix", "-b", "0"], "--batch '0'"),
    (["bench", "matrix", "-j", "0"], "'--jobs' / '-j'"),
    (["bench", "matrix", "--steps", "0"], "'--steps' / '-s'"),
    (["bench", "matrix", "--preset", "nope"], "unknown --preset"),
    (["bench", "live", "--trajectories", "0"], "'--trajectories'"),
    (["bench", "live", "--steps", "0"], "'--steps'"),
    (["bench", "live", "--gap", "inf"], "'--gap': inf is not a finite number"),
    (["bench", "live", "--seed", "-3"], "'--seed'"),
    (["bench", "live", "--sandbox", "docker"], "'--sandbox': 'docker'"),
    (["bench", "live", "--sandbox", "container"], "'--image'"),
    (["bench", "live", "--image", "oci:/x:y"], "'--image'"),
    # status, config
    (["status", "--url", "ftp://example.org"], "is not an http(s) URL"),
    (["status", "--url", "http://127.0.0.1:99999"], "Port out of range"),
    (["status", "--url", "127.0.0.1:8000"], "is not an http(s) URL"),
    (["status", "--timeout", "0"], "'--timeout'"),
    (["status", "--timeout", "nan"], "'--timeout'"),
    (["config", "check", "{MISSING}"], "'FILE': file"),
    (["config", "check", "{DIR}"], "is a directory"),
    (["config", "check"], "Missing argument 'FILE'"),
    (["nope"], "No such command 'nope'"),
]


@pytest.mark.parametrize(
    ("args", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS]
)
def test_bad_options_are_usage_errors(
    args: list[str], message: str, files: dict[str, str], tmp_path: Path
) -> None:
    args = [a.format(**files) for a in args]
    if args[0] == "bench" and args[1] != "live" and not {"-o", "--out"} & set(args):
        args += ["--out", str(tmp_path / "out")]
    assert_usage_error(invoke(*args), message)
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "Input should be less than or equal to 65535"),
        (["--port", "-1"], "Input should be greater than or equal to 0"),
        (["--log-level", "verbose"], "'verbose' is not one of"),
    ],
)
def test_serve_refuses_bad_options_before_its_banner(args: list[str], message: str) -> None:
    """As users run it: a process, exit status 2, no start-up line, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "tangram.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert "Traceback" not in run.stderr and "lease API on" not in run.stderr
    assert message in " ".join(run.stderr.replace("│", " ").split())


def test_bench_errors_go_to_stderr(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"kind": "trajectory", "id": "t0"}\n{"kind": "action"}\n')
    res = invoke("bench", "replay", str(trace), "-w", "coding", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "error:" in res.stderr and "line 2" in res.stderr


# ---- --version and -h ------------------------------------------------------------


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"tangram-broker {tangram.__version__}"


def command_paths() -> list[list[str]]:
    """Every command and group of the tree, as the words that name it."""
    out: list[list[str]] = [[]]

    def walk(cmd: Any, path: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            out.append([*path, name])
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_the_tree_has_every_command() -> None:
    names = {" ".join(p) for p in command_paths()}
    assert {"serve", "status", "config check", "config schema", "bench sim", "bench live"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "tangram")
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_h_is_help_everywhere(path: list[str], flag: str) -> None:
    res = invoke(*path, flag)
    assert res.exit_code == 0, res.output
    assert "Usage" in res.stdout


# ---- config check / schema -------------------------------------------------------


def test_config_check_summarises_a_valid_file() -> None:
    res = invoke("config", "check", str(ROOT / "deploy" / "pools.example.yaml"))
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    out = res.stdout
    assert "pools.example.yaml: valid" in out and "policy tangram" in out
    for pool in ("cpu", "gpu", "search", "judge"):
        assert f"  {pool} " in out
    assert "128 cores on 2 nodes" in out and "no tenants" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pools: {}\n", "pools: Dictionary should have at least 1 item"),
        ("pools: [\n", "not valid YAML"),
        ("pools:\n  cpu: {kind: tpu}\n", "pools.cpu"),
        ("policy: fastest\npools:\n  api: {kind: quota, concurrency: 1}\n", "policy"),
        ("pools:\n  api: {kind: quota, concurrency: 1}\nbogus: 1\n", "bogus"),
        (
            "pools:\n  api: {kind: quota, concurrency: 1}\n"
            "server:\n  tenants:\n    a: {token: short}\n",
            "token",
        ),
    ],
)
def test_config_check_refuses_an_invalid_file(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(text)
    res = invoke("config", "check", str(cfg))
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.startswith(f"tangram config check: {cfg}: ")
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_config_check_reads_the_tokens_file(tmp_path: Path) -> None:
    base = "pools:\n  api: {kind: quota, concurrency: 1}\nserver: {tokens_file: tokens.txt}\n"
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(base)
    # Not on this machine (a deployment's secret): checked as far as possible, and said.
    res = invoke("config", "check", str(cfg))
    assert res.exit_code == 0, res.output
    assert "not on this machine" in res.stdout and "warning" in res.stderr
    (tmp_path / "tokens.txt").write_text("alice alice-token-0123456789\nbob bob-token-0123456789\n")
    res = invoke("config", "check", str(cfg))
    assert res.exit_code == 0 and "2 tenants" in res.stdout and res.stderr == ""
    (tmp_path / "tokens.txt").write_text("alice short\n")
    res = invoke("config", "check", str(cfg))
    assert res.exit_code == 2 and "under 16 characters" in res.stderr


def test_config_schema_is_a_json_schema_that_accepts_the_shipped_files() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    res = invoke("config", "schema")
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    assert schema == config_schema_document()
    validator_class = jsonschema.validators.validator_for(schema)
    assert validator_class is jsonschema.Draft202012Validator
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    for name in ("pools.example.yaml", "image/tangram.yaml"):
        validator.validate(yaml.safe_load((ROOT / "deploy" / name).read_text()))
    validator.validate(default_config().model_dump(mode="json", exclude_none=True))
    assert {"cpu", "gpu", "quota"} <= set(
        schema["properties"]["pools"]["additionalProperties"]["discriminator"]["mapping"]
    )
    # What the loader refuses, an editor flags too.
    for bad in (
        {"pools": {}},
        {"pools": {"api": {"kind": "tpu"}}},
        {"pools": {"api": {"kind": "quota", "concurrency": 0}}},
        {"pools": {"api": {"kind": "quota"}}, "bogus": 1},
        {"pools": {"api": {"kind": "quota"}}, "durability": "sometimes"},
    ):
        assert not validator.is_valid(bad), bad


# ---- status ------------------------------------------------------------------------

TOKEN = "status-token-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A real server (uvicorn in a thread) with one lease held and one action queued."""
    from tangram.server import LiveServer, create_app

    cfg = parse_config(
        {
            "pools": {
                "cpu": {
                    "kind": "cpu",
                    "nodes": [{"name": "n", "count": 2, "cores": 2, "memory_gb": 8}],
                },
                "api": {"kind": "quota", "concurrency": 1},
            },
            "server": {"tenants": {"rl": {"token": TOKEN}}},
        }
    )
    with LiveServer(create_app(cfg)) as url:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=auth, timeout=10) as http:
            one = {"trajectory": "t1", "demands": {"api": 1}}
            two = {"trajectory": "t2", "demands": {"api": 1}}
            cpu = {"trajectory": "t3", "demands": {"cpu": 2}}
            assert http.post("/v1/actions", params={"wait": 5}, json=one).status_code == 200
            assert http.post("/v1/actions", json=two).status_code == 202
            assert http.post("/v1/actions", params={"wait": 5}, json=cpu).status_code == 200
            yield url


def test_status_shows_pools_use_queues_and_leases(server: str) -> None:
    res = invoke("status", "--url", server, "--token", TOKEN)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"Tangram broker at {server}"
    assert lines[1] == "policy tangram: 2 leases held, 1 action queued"
    table = lines[3 : lines.index("", 3)]
    rows = {line.split()[0]: line.split() for line in table}
    assert rows["pool"][:4] == ["pool", "kind", "in", "use"]
    assert rows["api"][:5] == ["api", "quota", "1/1", "(100%)", "1"]
    assert rows["cpu"][:5] == ["cpu", "cpu", "2/4", "(50%)", "0"]
    # The CPU pool's nodes, each with its own use.
    assert sorted(r[1] for name, r in rows.items() if name.startswith("n-")) == ["0/2", "2/2"]
    # Who queues where, who waits longest and why, how old the leases are.
    rest = lines[len(table) + 3 :]
    assert rest[:3] == ["", "queued per tenant", rest[2]] and rest[3].split() == ["api", "rl", "1"]
    waiting = rest[rest.index("oldest waiting") + 1]
    assert " t2 (tenant rl)  api  waiting " in waiting
    assert "pool 'api'" in waiting or "permit" in waiting, waiting
    ages = next(line for line in rest if line.startswith("leases by age: "))
    assert ages == "leases by age: <10s 2, 10s-1m 0, 1m-10m 0, >=10m 0"
    assert sum(1 for line in rest if "  held " in line) == 2


def test_status_lists_only_the_tenants_own_actions() -> None:
    from tangram.server import LiveServer, create_app

    tokens = {"a": "tenant-a-token-0123456789", "b": "tenant-b-token-0123456789"}
    cfg = parse_config(
        {
            "pools": {"api": {"kind": "quota", "concurrency": 1}},
            "server": {"tenants": {n: {"token": t} for n, t in tokens.items()}},
        }
    )
    with LiveServer(create_app(cfg)) as url:
        for name in ("a", "b"):
            auth = {"Authorization": f"Bearer {tokens[name]}"}
            body = {"trajectory": f"traj-{name}", "demands": {"api": 1}}
            res = httpx.post(f"{url}/v1/actions", json=body, headers=auth)
            assert res.status_code in (200, 202)
        auth = {"Authorization": f"Bearer {tokens['b']}"}
        doc = httpx.get(f"{url}/v1/status", headers=auth).json()
    # Every count, but only b's own actions by name (ids and trajectories are b's business).
    assert doc["queued_by_tenant"] == {"api": {"b": 1}}
    assert doc["leases_by_age"]["<10s"] == 1 and doc["oldest_leases"] == []
    assert [w["trajectory"] for w in doc["oldest_waiting"]] == ["traj-b"]
    assert doc["oldest_waiting"][0]["reason"] in ("insufficient_units", "behind_earlier_action")


def test_status_json_is_the_pools_document(server: str) -> None:
    res = invoke("status", "--json", env={"TANGRAM_URL": server, "TANGRAM_TOKEN": TOKEN})
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["leases"], doc["queued"]) == (2, 1)
    assert doc["pools"]["api"]["in_use"] == 1 and doc["pools"]["api"]["queued"] == 1


def test_status_without_the_token_says_to_give_one(server: str) -> None:
    res = invoke("status", "--url", server)
    assert res.exit_code == 1
    assert res.stdout == ""
    assert "refused the request" in res.stderr and "--token or TANGRAM_TOKEN" in res.stderr
    res = invoke("status", "--url", server, "--token", "not-the-token-0123456789")
    assert res.exit_code == 1 and "a token the server knows" in res.stderr


def test_status_of_nothing_listening_is_a_clean_error() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = invoke("status", "--url", f"http://127.0.0.1:{port}", "--timeout", "2")
    assert res.exit_code == 1
    assert res.stdout == "" and f"127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.output


def test_status_of_something_else_is_refused() -> None:
    from tangram.server.run import LiveServer

    async def other(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b'{"hello": "world"}'})

    with LiveServer(other) as url:
        res = invoke("status", "--url", url)
    assert res.exit_code == 1
    assert "does not answer GET /v1/status like a Tangram broker" in res.stderr


def test_format_status_without_nodes_or_unit_times() -> None:
    doc = {
        "policy": "min",
        "leases": 1,
        "queued": 0,
        "pools": {"api": {"kind": "quota", "capacity": 0, "in_use": 0, "queued": 0}},
    }
    text = format_status("http://x", doc)
    assert "1 lease held, 0 actions queued" in text
    assert text.splitlines()[-1].split() == ["api", "quota", "0/0", "0", "-"]
