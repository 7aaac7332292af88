"""edge.speed: the Orin projection from green-context measurements (pure arithmetic, no GPU)."""

import json

import pytest

from bench.random_bundle import CONFIGS
from edge.models.spec import spec_from_hf_config
from edge.quant.policy import bytes_read_per_token
from edge.speed import BANDWIDTH_EFFICIENCY, SHORT_CONTEXT, project, reference_data


def _spec(name):
    return spec_from_hf_config(dict(CONFIGS[name]))


def test_projection_for_the_measured_model_follows_the_formula():
    spec = _spec("llama-3.2-1b")
    ref = reference_data()
    p = project(spec, "orin-nx-16gb", "int4", 128, power_mode="25W")
    assert p.sms == 8 and p.power_mode == "25W"
    row = next(r for r in ref["measurements"] if r["model"] == "llama-3.2-1b" and r["sms"] == 8)
    clock = ref["sm_clock_mhz"] / 918
    bpt = bytes_read_per_token(spec, "int4", 128) + SHORT_CONTEXT * spec.kv_bytes_per_token(2)
    t_sm = clock / row["decode_b1_tok_s"] * bpt / row["bytes_per_token"]
    t_bw = bpt / (BANDWIDTH_EFFICIENCY * 102.4e9)
    assert p.decode_tok_s == pytest.approx(1 / max(t_sm, t_bw), rel=1e-3)
    assert p.decode_bound == ("sm" if t_sm >= t_bw else "bandwidth")
    assert p.prefill_ms == pytest.approx(row["prefill_2048_ms"] * clock * 2.0, rel=1e-3)  # Hopper / Ampere tensor rate


def test_projection_orders_devices_and_power_modes():
    spec = _spec("llama-3.2-1b")
    agx, nx, nano = (project(spec, p) for p in ("agx-orin-64gb", "orin-nx-16gb", "orin-nano-8gb"))
    assert agx.sms == 16 and nx.sms == 8 and nano.sms == 8
    assert agx.decode_tok_s > nx.decode_tok_s >= nano.decode_tok_s
    assert agx.prefill_ms < nx.prefill_ms < nano.prefill_ms
    slow = project(spec, "orin-nx-16gb", power_mode="10W")
    assert slow.prefill_ms > nx.prefill_ms and slow.decode_tok_s <= nx.decode_tok_s
    # a smaller model is projected faster (scaled by bytes and parameters)
    small = project(_spec("qwen2.5-0.5b"), "orin-nx-16gb")
    assert small.decode_tok_s > nx.decode_tok_s and small.prefill_ms < nx.prefill_ms


def test_no_projection_off_jetson():
    spec = _spec("llama-3.2-1b")
    assert project(spec, "cpu") is None
    assert project(spec, "h100-80gb") is None


def test_plan_cli_prints_and_returns_the_projection(tmp_path):
    from typer.testing import CliRunner

    import edge.cli  # noqa: F401  (registers every command)
    from edge.cli.app import app

    cfg = {k: v for k, v in CONFIGS["llama-3.2-1b"].items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    runner, model = CliRunner(), ["--model", str(tmp_path)]
    r = runner.invoke(app, ["plan", *model, "--profile", "orin-nx-16gb", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    proj, rec = d["projection"], d["recommendation"]
    assert proj["profile"] == "orin-nx-16gb" and proj["sms"] == 8
    want = project(_spec("llama-3.2-1b"), "orin-nx-16gb", rec["quant"], rec["group_size"] or 128)  # the recommended weights
    assert proj["decode_tok_s"] == want.decode_tok_s and proj["prefill_ms"] == want.prefill_ms
    r = runner.invoke(app, ["plan", *model, "--profile", "orin-nx-16gb"])
    assert r.exit_code == 0, r.output
    assert "projected cuda speed" in r.stdout and "not a measurement" in r.stdout
    r = runner.invoke(app, ["plan", *model, "--profile", "cpu", "--json"])
    assert json.loads(r.stdout)["projection"] is None
