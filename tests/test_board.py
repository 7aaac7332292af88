"""tegrastats / nvpmodel parsers on real output lines, quoted verbatim with where each came from,
and the sysfs readers on fixture trees (edge/board.py)."""

from __future__ import annotations

import pytest

from edge.board import (NvpMode, parse_nvpmodel, parse_tegrastats, power_mode_check, read_power_rails,
                        read_thermal)
from edge.profiles import load_profile

# Orin Nano 8GB, JetPack 6 (kernel 5.15.148-tegra), lower-case sensor names, GR3D without a clock.
# Source: github.com/henrygd/beszel agent/gpu_test.go, test case "orin nano" (a user's board; the
# same board's report is henrygd/beszel issue #286).
ORIN_NANO_JP6 = ("06-18-2025 11:25:24 RAM 3452/7620MB (lfb 25x4MB) SWAP 1518/16384MB (cached 174MB) "
                 "CPU [1%@1420,2%@1420,0%@1420,2%@1420,2%@729,1%@729] GR3D_FREQ 0% cpu@50.031C soc2@49.031C "
                 "soc0@50C gpu@49.031C tj@50.25C soc1@50.25C VDD_IN 4824mW/4824mW VDD_CPU_GPU_CV 518mW/518mW "
                 "VDD_SOC 1475mW/1475mW")

# AGX Orin 64GB, JetPack 6 (L4T R36.4.4, nvidia-l4t-core 36.4.4-20250616085344), 12 cores, two GPCs.
# Source: github.com/lesomnus/tegra-exporter stats/parse_test.go, case "5.15.148" (first line).
AGX_ORIN_JP6 = ("05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
                "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,"
                "6%@1036,10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off NVJPG off "
                "NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.562C "
                "soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW "
                "VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW")

# AGX Orin 64GB, JetPack 5 form (upper-case sensor names, Tboard/Tdiode, absent CV/GPU sensors at
# -256C, NC rails). Source: a public Go tegrastats parser's test (TestParseTemps), found by content
# search of public GitHub sources; its repository could not be identified from the search index.
AGX_ORIN_JP5 = ("04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
                "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
                "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C "
                "SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C "
                "VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW "
                "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")

# Jetson TX2, JetPack 4 form (rails without units, GR3D with one clock, no timestamp).
# Source: github.com/aptpod/zabbix-agent2-plugin-tegrastats stats_test.go (first case).
TX2_JP4 = ("RAM 1873/3830MB (lfb 144x4MB) CPU [8%@2016,26%@2034,24%@2035,7%@2026,7%@2034,6%@2034] "
           "EMC_FREQ 0%@1600 GR3D_FREQ 0%@114 APE 150 MTS fg 0% bg 1% PLL@39C MCPU@39C PMIC@50C Tboard@35C "
           "GPU@37C BCPU@39C thermal@38.5C Tdiode@37C VDD_SYS_GPU 77/77 VDD_SYS_SOC 539/539 VDD_IN 2930/3405 "
           "VDD_SYS_CPU 539/937 VDD_SYS_DDR 727/758")


def test_orin_nano_jetpack6():
    s = parse_tegrastats(ORIN_NANO_JP6)
    assert s.time == "06-18-2025 11:25:24"
    assert (s.ram_used_mb, s.ram_total_mb) == (3452, 7620)
    assert (s.swap_used_mb, s.swap_total_mb, s.swap_cached_mb) == (1518, 16384, 174)
    assert [(c.load_pct, c.freq_mhz) for c in s.cpus] == [(1, 1420), (2, 1420), (0, 1420), (2, 1420), (2, 729), (1, 729)]
    assert s.cpu_load_pct == pytest.approx(8 / 6)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [])
    assert s.temps_c == {"cpu": 50.031, "soc2": 49.031, "soc0": 50.0, "gpu": 49.031, "tj": 50.25, "soc1": 50.25}
    assert s.power_mw == {"VDD_IN": 4824, "VDD_CPU_GPU_CV": 518, "VDD_SOC": 1475}
    assert s.total_power_mw == 4824


def test_agx_orin_jetpack6():
    s = parse_tegrastats(AGX_ORIN_JP6)
    assert (s.ram_used_mb, s.ram_total_mb) == (18207, 62841)
    assert len(s.cpus) == 12 and s.cpus[3].freq_mhz == 2201 and s.cpus[5].load_pct == 47
    assert (s.emc_load_pct, s.emc_freq_mhz) == (3, 2133)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [0, 0])
    assert s.temps_c["tj"] == 52.562 and "gpu" not in s.temps_c
    assert s.power_mw == {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707}
    assert s.total_power_mw == 4707  # AGX Orin's module input rail


def test_agx_orin_jetpack5_drops_absent_sensors_and_keeps_case_insensitive_names():
    s = parse_tegrastats(AGX_ORIN_JP5)
    assert s.temps_c == {"cpu": 44.562, "tboard": 32.0, "soc2": 40.093, "tdiode": 33.0, "soc0": 41.093,
                         "tj": 44.343, "soc1": 41.25}  # CV0/CV1/CV2/GPU@-256C: sensors absent
    assert s.power_mw["VDDQ_VDD2_1V8AO"] == 301 and s.power_mw["VIN_SYS_5V0"] == 4025
    assert s.gpu_freq_mhz == [0, 0] and len(s.cpus) == 12


def test_jetpack4_rails_without_units():
    s = parse_tegrastats(TX2_JP4)
    assert s.time is None and s.swap_total_mb is None
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [114])
    assert s.power_mw["VDD_IN"] == 2930 and s.power_avg_mw["VDD_IN"] == 3405
    assert s.temps_c["thermal"] == 38.5


def test_offline_cores_and_refusal():
    s = parse_tegrastats("RAM 1224/15368MB (lfb 8x4MB) CPU [1%@729,0%@729,off,off] VDD_IN 4319mW/4319mW")
    assert [c.load_pct for c in s.cpus] == [1, 0, None, None] and s.cpu_load_pct == 0.5
    with pytest.raises(ValueError, match="not a tegrastats line"):
        parse_tegrastats("tegrastats: permission denied")


# `nvpmodel -q` prints the mode name, then its id; warnings may come first.
# Source: AGX Orin Developer Kit, JetPack 6 (kernel 5.15.185-tegra), "$ nvpmodel -q / NV Power Mode:
# MAXN / 0", quoted in a public device audit (found by content search of public GitHub sources); the
# warning line form is from github.com/rbonghi/jetson_stats tests/nvpmodel (show_query), an emulator
# of the tool's output.
NVP_AGX = "NV Power Mode: MAXN\n0\n"
NVP_WARN = "NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_30W\n2\n"


def test_nvpmodel_query():
    assert parse_nvpmodel(NVP_AGX) == NvpMode("MAXN", 0)
    assert parse_nvpmodel(NVP_WARN) == NvpMode("MODE_30W", 2)
    with pytest.raises(ValueError):
        parse_nvpmodel("nvpmodel: command not found")


def test_power_mode_check_against_profile():
    nano = load_profile("orin-nano-8gb")  # plans for MAXN_SUPER (102 GB/s)
    ok = power_mode_check(NvpMode("MAXN_SUPER", 2), nano)
    assert ok["match"] is True and ok["warning"] is None
    bad = power_mode_check(NvpMode("15W", 0), nano)
    assert bad["match"] is False
    assert "15W is live" in bad["warning"] and "MAXN_SUPER" in bad["warning"] and "33% slower" in bad["warning"]
    agx = power_mode_check(NvpMode("MODE_30W", 2), load_profile("agx-orin-64gb"))
    assert agx["match"] is False and "MAXN" in agx["warning"]
    assert power_mode_check(NvpMode("MODE_30W", 2), load_profile("agx-orin-64gb"))["live"] == "MODE_30W"
    assert power_mode_check(None, nano)["match"] is None


def test_sysfs_thermal_and_ina3221(tmp_path):
    for i, (kind, milli) in enumerate([("cpu-thermal", 50031), ("gpu-thermal", 49500), ("cv0-thermal", -256000)]):
        z = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(f"{milli}\n")
    hw = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    for n, label, mv, ma in [(1, "VDD_IN", 5080, 950), (2, "VDD_CPU_GPU_CV", 5072, 102), (3, "VDD_SOC", 5064, 291)]:
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    assert read_thermal(tmp_path) == {"cpu": 50.031, "gpu": 49.5}
    assert read_power_rails(tmp_path) == {"VDD_IN": 4826, "VDD_CPU_GPU_CV": 517, "VDD_SOC": 1474}
    assert read_thermal(tmp_path / "nowhere") == {} and read_power_rails(tmp_path / "nowhere") == {}
