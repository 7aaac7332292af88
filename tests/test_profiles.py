"""Device profiles: every shipped file validates and states the published facts; bad files and
unknown names are refused with messages naming the file, the field and what is allowed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml

from edge.errors import ProfileError, UsageError
from edge.paths import REPO_ROOT
from edge.profiles import (
    GIB,
    detect_profile,
    list_profiles,
    load_profile,
    load_profile_file,
    match_compatible,
    parse_size,
    profile_names,
)

SHIPPED = sorted(p.stem for p in (REPO_ROOT / "profiles").glob("*.yaml"))
JETSON = ["agx-orin-64gb", "agx-orin-32gb", "orin-nx-16gb", "orin-nx-8gb", "orin-nano-8gb", "orin-nano-4gb"]


def test_every_shipped_profile_validates():
    profiles = list_profiles()
    assert sorted(p.name for p in profiles) == SHIPPED
    assert set(JETSON + ["cpu", "h100-80gb"]) <= set(SHIPPED)
    for p in profiles:
        assert Path(p.path).stem == p.name
        assert 0 < p.usable_bytes < p.memory_bytes
        assert p.power_mode().name == p.default_power_mode
        assert all(m.bandwidth_gbps > 0 for m in p.power_modes)


def test_list_orders_jetson_by_memory_then_gpu_then_cpu():
    kinds = [p.kind for p in list_profiles()]
    assert kinds == sorted(kinds, key=["jetson", "gpu", "cpu"].index)
    jet = [p.memory_bytes for p in list_profiles() if p.kind == "jetson"]
    assert jet == sorted(jet)


@pytest.mark.parametrize(
    "name, mem_gib, dla, peak_gbps, base_gbps",
    [
        ("agx-orin-64gb", 64, 2, 204.8, 204.8),
        ("agx-orin-32gb", 32, 2, 204.8, 204.8),
        ("orin-nx-16gb", 16, 2, 102.4, 102.4),
        ("orin-nx-8gb", 8, 1, 102.4, 102.4),
        ("orin-nano-8gb", 8, 0, 102.0, 68.0),  # 68 GB/s, 102 GB/s in the Super modes
        ("orin-nano-4gb", 4, 0, 51.0, 34.0),  # 34 GB/s, 51 GB/s in the Super modes
    ],
)
def test_jetson_facts(name, mem_gib, dla, peak_gbps, base_gbps):
    p = load_profile(name)
    assert p.kind == "jetson" and p.unified_memory
    assert p.memory_bytes == mem_gib * GIB
    assert p.dla_cores == dla
    assert p.compute_capability == "8.7"
    bws = [m.bandwidth_gbps for m in p.power_modes]
    assert max(bws) == peak_gbps and min(bws) == base_gbps
    assert set(p.precisions) == {"fp16", "int8", "int4_weight_only"}  # Orin: no FP8
    assert not p.supports("fp8")
    assert (p.jetpack, p.cuda, p.tensorrt) == ("6.2", "12.6", "10.3")
    assert p.device_tree_compatible and all(c.startswith("nvidia,p3") for c in p.device_tree_compatible)
    if "nano" in name or "nx" in name:
        assert "MAXN_SUPER" in [m.name for m in p.power_modes]  # JetPack 6.2 Super modes


def test_nano_8gb_leaves_about_5_2_gib_for_models():
    assert load_profile("orin-nano-8gb").usable_bytes / GIB == pytest.approx(5.2, abs=0.05)


def test_h100_profile():
    p = load_profile("h100-80gb")
    assert p.kind == "gpu" and not p.unified_memory
    assert p.compute_capability == "9.0"
    assert p.power_mode().bandwidth_gbps == pytest.approx(3350)
    assert p.memory_bytes == 80 * GIB


def test_cpu_profile_reads_memory_from_the_machine():
    assert load_profile("cpu").memory_bytes == psutil.virtual_memory().total


def test_unknown_name_suggests_closest():
    with pytest.raises(ProfileError) as e:
        load_profile("orin-nano-8")
    msg = str(e.value)
    assert "unknown profile 'orin-nano-8'" in msg
    assert "did you mean orin-nano-8gb" in msg
    assert "agx-orin-64gb" in msg  # the full list follows


def test_unknown_power_mode_lists_the_modes():
    with pytest.raises(ProfileError, match="MAXN_SUPER"):
        load_profile("orin-nano-8gb").power_mode("MAXN-SUPR")
    assert load_profile("orin-nano-8gb").power_mode("maxn_super").name == "MAXN_SUPER"


# ---- bad files --------------------------------------------------------------------------------


def _good() -> dict:
    return yaml.safe_load((REPO_ROOT / "profiles" / "orin-nano-8gb.yaml").read_text())


def _write(tmp_path: Path, data: dict, stem: str = "orin-nano-8gb") -> Path:
    f = tmp_path / f"{stem}.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_a_copy_of_a_good_profile_loads(tmp_path):
    p = load_profile_file(_write(tmp_path, _good()))
    assert p.path == str(tmp_path / "orin-nano-8gb.yaml")
    assert replace(p, path="") == replace(load_profile("orin-nano-8gb"), path="")


@pytest.mark.parametrize(
    "mutate, field, allowed",
    [
        (lambda d: d.pop("memory_gib"), "memory_gib", "positive number of GiB"),
        (lambda d: d.update(memory_gib="lots"), "memory_gib", "positive number of GiB"),
        (lambda d: d.update(kind="phone"), "kind", "jetson, gpu, cpu"),
        (lambda d: d.update(precisions=["fp16", "int3"]), "precisions", "int4_weight_only"),
        (lambda d: d.update(compute_capability=8.7), "compute_capability", "major.minor"),
        (lambda d: d.update(dla_cores=-1), "dla_cores", "integer >= 0"),
        (lambda d: d.update(default_power_mode="TURBO"), "default_power_mode", "MAXN_SUPER"),
        (lambda d: d["power_modes"][0].pop("bandwidth_gbps"), "power_modes", "bandwidth_gbps"),
        (lambda d: d.update(os_reserve_gib=9), "os_reserve_gib", "below the memory"),
        (lambda d: d.update(name="orin-nano-9gb"), "name", "file's name"),
        (lambda d: d.update(software={"jetpack": "6.2"}), "software", "jetpack, cuda, tensorrt"),
        (lambda d: d.update(device_tree_compatible=[]), "device_tree_compatible", "at least one"),
    ],
)
def test_bad_field_names_file_field_and_allowed(tmp_path, mutate, field, allowed):
    d = _good()
    mutate(d)
    f = _write(tmp_path, d)
    with pytest.raises(ProfileError) as e:
        load_profile_file(f)
    msg = str(e.value)
    assert str(f) in msg
    assert f"field '{field}'" in msg
    assert "allowed:" in msg and allowed in msg


def test_compute_capability_8_7_unquoted_is_refused_but_quoted_loads(tmp_path):
    # YAML reads 8.7 as a float; 8.10 would silently become 8.1, so a string is required.
    d = _good()
    d["compute_capability"] = "8.7"
    assert load_profile_file(_write(tmp_path, d)).compute_capability == "8.7"


def test_unknown_field_is_refused_with_a_suggestion(tmp_path):
    d = _good()
    d["memory_gb"] = d.pop("memory_gib")
    with pytest.raises(ProfileError) as e:
        load_profile_file(_write(tmp_path, d))
    assert "unknown field 'memory_gb'" in str(e.value) and "did you mean 'memory_gib'" in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: broken\npower_modes: [\n")
    with pytest.raises(ProfileError, match="broken.yaml: not valid YAML"):
        load_profile_file(f)


def test_memory_auto_only_for_cpu(tmp_path):
    d = _good()
    d["memory_gib"] = "auto"
    with pytest.raises(ProfileError, match="only for kind cpu"):
        load_profile_file(_write(tmp_path, d))


def test_profiles_dir_override_and_bad_file_in_listing(tmp_path, monkeypatch):
    _write(tmp_path, _good())
    bad = _good()
    bad["name"] = "x"
    del bad["cuda_cores"]
    _write(tmp_path, bad, stem="x")
    monkeypatch.setenv("EDGE_RAG_PROFILES", str(tmp_path))
    assert profile_names() == ["orin-nano-8gb", "x"]
    assert load_profile("orin-nano-8gb").name == "orin-nano-8gb"
    with pytest.raises(ProfileError, match=r"x\.yaml: field 'cuda_cores' is missing"):
        list_profiles()


# ---- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compatible, expected",
    [
        (["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"], "orin-nano-8gb"),
        (["nvidia,p3768-0000+p3767-0004", "nvidia,tegra234"], "orin-nano-4gb"),  # board id only
        (["nvidia,p3768-0000+p3767-0000", "nvidia,tegra234"], "orin-nx-16gb"),
        (["nvidia,p3768-0000+p3767-0001", "nvidia,tegra234"], "orin-nx-8gb"),
        (["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"], "agx-orin-64gb"),
        (["nvidia,p3737-0000+p3701-0004", "nvidia,tegra234"], "agx-orin-32gb"),
        (["raspberrypi,5-model-b", "brcm,bcm2712"], None),
    ],
)
def test_match_compatible(compatible, expected):
    assert match_compatible(compatible, list_profiles()) == expected


def test_detect_profile(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_RAG_PROFILE", raising=False)
    dt = tmp_path / "compatible"
    dt.write_bytes(b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")
    assert detect_profile(compatible_path=dt, gpu_names=[]) == "orin-nano-8gb"
    missing = tmp_path / "none"
    assert detect_profile(compatible_path=missing, gpu_names=["NVIDIA H100 80GB HBM3"]) == "h100-80gb"
    assert detect_profile(compatible_path=missing, gpu_names=["NVIDIA GeForce RTX 4070"]) == "cpu"
    assert detect_profile(compatible_path=missing, gpu_names=[]) == "cpu"
    monkeypatch.setenv("EDGE_RAG_PROFILE", "agx-orin-32gb")
    assert detect_profile(compatible_path=dt, gpu_names=[]) == "agx-orin-32gb"
    monkeypatch.setenv("EDGE_RAG_PROFILE", "agx-orin-33gb")
    with pytest.raises(ProfileError, match="did you mean agx-orin-32gb"):
        detect_profile()


# ---- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5.5GB", 5_500_000_000),
        ("5.5 GB", 5_500_000_000),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512mb", 512_000_000),
        ("1.5Gi", int(1.5 * 2**30)),
        ("1G", 10**9),
        ("123", 123),
        ("0", 0),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5.5 parsecs", "-1GB", "1e", "five GB"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)
