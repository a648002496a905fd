"""The shipped example configuration, the examples in docs/configuration.md, and the
errors a malformed configuration gives."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tangram.config import ConfigError, default_config, load_config, parse_config
from tangram.core.managers.cpu import CpuManager
from tangram.core.managers.gpu import GpuManager
from tangram.core.managers.quota import QuotaManager

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "pools.example.yaml"
DOC = ROOT / "docs" / "configuration.md"


def _doc_yaml_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _build(data: Any) -> None:
    parse_config(data).build_pools()


def _cpu(**node: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"cores": 4, "memory_gb": 8}
    base.update(node)
    return {"pools": {"cpu": {"kind": "cpu", "nodes": [base]}}}


# --------------------------------------------------------------------------- the example


def test_example_config_loads_and_builds_every_pool() -> None:
    cfg = load_config(EXAMPLE)
    pools = cfg.build_pools()
    assert set(pools) == {"cpu", "gpu", "search", "judge"}
    assert cfg.build_policy().name == "tangram"
    assert cfg.lease_ttl_seconds == 60

    cpu = pools["cpu"]
    assert isinstance(cpu, CpuManager)
    assert sorted(cpu.nodes) == ["sandbox-0", "sandbox-1"]
    for node in cpu.nodes.values():
        assert node.cores == 64
        assert node.numa == [list(range(32)), list(range(32, 64))]
        assert node.memory_gb == 256

    gpu = pools["gpu"]
    assert isinstance(gpu, GpuManager)
    assert sorted(gpu.nodes) == ["gpu-0", "gpu-1"]
    assert all(n.gpus == 8 and n.memory_gb == 80 for n in gpu.nodes.values())
    assert set(gpu.services) == {"reward-7b", "teacher-32b"}

    search = pools["search"]
    assert isinstance(search, QuotaManager)
    assert search.concurrency == 32
    assert search.rate is not None and search.rate.rate == pytest.approx(10.0)
    assert search.rate.capacity == 20
    assert (search.window_limit, search.window_seconds) == (100000, 86400)

    judge = pools["judge"]
    assert isinstance(judge, QuotaManager)
    assert judge.tpm is not None and judge.tpm.capacity == 2_000_000
    assert judge.default_tokens == 4000


# --------------------------------------------------------------------------- the docs


def test_configuration_doc_has_yaml_examples() -> None:
    assert len(_doc_yaml_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_doc_yaml_blocks())))
def test_configuration_doc_yaml_example_parses_and_builds(index: int) -> None:
    data = yaml.safe_load(_doc_yaml_blocks()[index])
    cfg = parse_config(data)
    assert cfg.build_pools()


def test_configuration_doc_full_example_is_the_shipped_file() -> None:
    shipped = yaml.safe_load(EXAMPLE.read_text())
    assert shipped in [yaml.safe_load(b) for b in _doc_yaml_blocks()]


# --------------------------------------------------------------------------- errors


def test_unknown_pool_kind_is_named() -> None:
    with pytest.raises(ConfigError, match=r"pools\.x.*'tpu'.*kind"):
        _build({"pools": {"x": {"kind": "tpu"}}})


def test_missing_cores_is_named() -> None:
    with pytest.raises(ConfigError, match=r"nodes\.0\.cores: Field required"):
        _build({"pools": {"cpu": {"kind": "cpu", "nodes": [{"memory_gb": 8}]}}})


def test_rate_with_both_per_second_and_per_minute_is_refused() -> None:
    data = {"pools": {"api": {"kind": "quota", "rate": {"per_second": 1, "per_minute": 60}}}}
    with pytest.raises(ConfigError, match=r"pool api: rate .*per_second.*per_minute"):
        _build(data)


def test_rate_with_neither_per_second_nor_per_minute_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pool api: rate"):
        _build({"pools": {"api": {"kind": "quota", "rate": {"burst": 5}}}})


def test_gpus_not_a_power_of_two_are_refused() -> None:
    data = {"pools": {"gpu": {"kind": "gpu", "nodes": [{"gpus": 6}]}}}
    with pytest.raises(ConfigError, match=r"pool gpu: gpus .*power of two"):
        _build(data)


def test_numa_lists_must_cover_the_cores() -> None:
    with pytest.raises(ConfigError, match=r"(?i)pool cpu, node cpu0: numa"):
        _build(_cpu(numa=[[0, 1], [2]]))


def test_numa_lists_must_not_repeat_a_core() -> None:
    with pytest.raises(ConfigError, match=r"(?i)numa"):
        _build(_cpu(numa=[[0, 1], [1, 2, 3]]))


def test_numa_count_must_be_within_the_cores() -> None:
    with pytest.raises(ConfigError, match=r"pool cpu: numa must be 1\.\.4"):
        _build(_cpu(numa=5))


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({**_cpu(), "colour": "blue"}, "colour"),
        ({"pools": {"cpu": {"kind": "cpu", "nodes": [], "extra": 1}}}, r"pools\.cpu\.cpu\.extra"),
        (_cpu(memory_gib=8), r"pools\.cpu\.cpu\.nodes\.0\.memory_gib"),
        ({"pools": {"api": {"kind": "quota", "concurency": 4}}}, r"pools\.api\.quota\.concurency"),
    ],
)
def test_unknown_fields_are_named(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where + r".*Extra inputs are not permitted"):
        _build(data)


def test_every_schema_error_is_listed() -> None:
    data = {"lease_ttl_seconds": 0, "pools": {"cpu": {"kind": "cpu", "nodes": [{}]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    text = str(err.value)
    for field in ("lease_ttl_seconds", "nodes.0.cores", "nodes.0.memory_gb"):
        assert field in text


def test_bad_policy_is_named() -> None:
    with pytest.raises(ConfigError, match=r"policy: .*fixed:K"):
        parse_config({**_cpu(), "policy": "fixed:0"})


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pools: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_duplicate_node_names_are_refused() -> None:
    data = {
        "pools": {
            "cpu": {
                "kind": "cpu",
                "nodes": [
                    {"name": "n", "count": 2, "cores": 4, "memory_gb": 8},
                    {"name": "n-1", "cores": 4, "memory_gb": 8},
                ],
            }
        }
    }
    with pytest.raises(ConfigError, match="node names must be unique"):
        _build(data)


# --------------------------------------------------------------------------- documented rules


def test_node_names_follow_the_count_rule() -> None:
    data = {
        "pools": {
            "cpu": {
                "kind": "cpu",
                "nodes": [
                    {"cores": 2, "memory_gb": 1},
                    {"count": 2, "cores": 2, "memory_gb": 1},
                    {"name": "big", "count": 2, "cores": 2, "memory_gb": 1},
                    {"name": "one", "cores": 2, "memory_gb": 1},
                ],
            }
        }
    }
    cpu = parse_config(data).build_pools()["cpu"]
    assert isinstance(cpu, CpuManager)
    assert list(cpu.nodes) == ["cpu0", "cpu1-0", "cpu1-1", "big-0", "big-1", "one"]


def test_numa_count_splits_cores_in_order() -> None:
    cpu = parse_config(_cpu(cores=5, numa=4)).build_pools()["cpu"]
    assert isinstance(cpu, CpuManager)
    assert cpu.nodes["cpu0"].numa == [[0, 1], [2], [3], [4]]


def test_rate_burst_defaults_to_one_second_of_permits() -> None:
    data = {"pools": {"api": {"kind": "quota", "rate": {"per_minute": 600}}}}
    api = parse_config(data).build_pools()["api"]
    assert isinstance(api, QuotaManager)
    assert api.rate is not None and api.rate.capacity == 10


# --------------------------------------------------------------------------- defaults


def test_default_config_builds_a_cpu_pool_with_this_machines_cores() -> None:
    cfg = default_config()
    pools = cfg.build_pools()
    cpu = pools["cpu"]
    assert isinstance(cpu, CpuManager)
    assert list(cpu.nodes) == ["local"]
    expected = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    assert sorted(c for g in cpu.nodes["local"].numa for c in g) == expected
    assert cpu.nodes["local"].memory_gb > 0
    api = pools["api"]
    assert isinstance(api, QuotaManager)
    assert api.concurrency == 16
    assert cfg.build_policy().name == "tangram"
    assert cfg.lease_ttl_seconds == 60


def test_service_parallelism_must_be_chunk_sizes() -> None:
    data = {
        "pools": {
            "gpu": {
                "kind": "gpu",
                "nodes": [{"gpus": 8}],
                "services": {"m": {"memory_gb": 1, "restore_seconds": 1, "parallelism": [3, 16]}},
            }
        }
    }
    with pytest.raises(ConfigError, match=r"service m parallelism \[3, 16\]"):
        parse_config(data)


def test_structural_errors_surface_when_loading_not_later() -> None:
    data = {"pools": {"gpu": {"kind": "gpu", "nodes": [{"gpus": 6}]}}}
    with pytest.raises(ConfigError, match="power of two"):
        parse_config(data)


@pytest.mark.parametrize(
    ("sandbox", "message"),
    [
        ({"backend": "container"}, "the container backend needs an image"),
        ({"image": "oci:/x:y"}, "sandbox.image is for backend: container"),
        (
            {"backend": "container", "image": "oci:/x:y", "confine": False},
            "the container backend is always confined",
        ),
        ({"backend": "docker"}, "pools.cpu.cpu.sandbox.backend"),
        ({"network": "bridge"}, "pools.cpu.cpu.sandbox.network"),
        ({"memory_mb": 0}, "pools.cpu.cpu.sandbox.memory_mb"),
        ({"idle_timeout_s": -1}, "pools.cpu.cpu.sandbox.idle_timeout_s"),
        ({"imgae": "oci:/x:y"}, "imgae"),
    ],
)
def test_bad_sandbox_sections_are_refused_with_the_field(
    sandbox: dict[str, Any], message: str
) -> None:
    pool = {"kind": "cpu", "nodes": [{"cores": 2, "memory_gb": 1}], "sandbox": sandbox}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"pools": {"cpu": pool}})
    good = {**pool, "sandbox": {"backend": "container", "image": "oci:/x:y"}}
    assert parse_config({"pools": {"cpu": good}}).pools["cpu"].sandbox.image == "oci:/x:y"  # type: ignore[union-attr]
