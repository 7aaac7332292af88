"""Commands: `edge-rag profiles [show NAME]`, `edge-rag plan`, `edge-rag doctor`.

Thin: parse, call edge.profiles / edge.plan / edge.doctor, print. Library imports happen inside
the command functions so that `edge-rag --help` stays light.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from edge.cli.app import app

profiles_app = typer.Typer(
    help="Device profiles: list them, or `show NAME` for one.",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
)
app.add_typer(profiles_app, name="profiles")


def _console():
    from rich.console import Console

    # Wide when captured (tests, pipes) so tables do not wrap mid-cell. No markup: values such
    # as "pip install 'edge-rag[cuda]'" must print verbatim; headings use _head().
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False, markup=False)


def _head(label: str, value: str = "", style: str = "bold", width: int = 13):
    """A bold label followed by plain text."""
    from rich.text import Text

    return Text.assemble((label.ljust(width), style), value)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ---- profiles ------------------------------------------------------------------------------


@profiles_app.callback()
def profiles_main(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List the device profiles (`edge-rag profiles show NAME` prints one)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from edge.profiles import format_size, list_profiles

    profiles = list_profiles()
    if json_out:
        _echo_json([p.to_dict() for p in profiles])
        return
    t = Table(title="Device profiles", title_justify="left")
    for col in ("name", "device", "memory", "usable", "bandwidth GB/s", "CC", "DLA", "power modes", "JetPack / CUDA / TRT"):
        t.add_column(col)
    for p in profiles:
        bws = sorted({m.bandwidth_gbps for m in p.power_modes})
        bw = f"{bws[0]:g}" if len(bws) == 1 else f"{bws[0]:g}-{bws[-1]:g}"
        sw = " / ".join(v or "-" for v in (p.jetpack, p.cuda, p.tensorrt))
        t.add_row(
            p.name, p.display_name, format_size(p.memory_bytes), format_size(p.usable_bytes), bw,
            p.compute_capability or "-", str(p.dla_cores), ", ".join(m.name for m in p.power_modes), sw,
        )
    _console().print(t)


@profiles_app.command("show")
def profiles_show(
    name: str = typer.Argument(..., help="Profile name, e.g. orin-nano-8gb."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Print one device profile."""
    from rich.table import Table

    from edge.profiles import format_size, load_profile

    p = load_profile(name)
    if json_out:
        _echo_json(p.to_dict())
        return
    c = _console()
    c.print(_head(p.name, f"  {p.display_name}  ({p.kind})", width=0))
    rows = [
        ("memory", f"{format_size(p.memory_bytes)} ({'unified CPU+GPU' if p.unified_memory else 'GPU memory'})"),
        ("OS reserve", format_size(p.os_reserve_bytes)),
        ("usable for engines", format_size(p.usable_bytes)),
        ("compute capability", p.compute_capability or "-"),
        ("CUDA / tensor cores", f"{p.cuda_cores} / {p.tensor_cores}"),
        ("DLA cores", str(p.dla_cores)),
        ("precisions", ", ".join(p.precisions)),
        ("JetPack / CUDA / TensorRT", " / ".join(v or "-" for v in (p.jetpack, p.cuda, p.tensorrt))),
        ("device tree", ", ".join(p.device_tree_compatible) or "-"),
        ("CUDA device names", ", ".join(p.gpu_names) or "-"),
        ("file", p.path),
    ]
    for k, v in rows:
        c.print(f"  {k:<26} {v}")
    t = Table(title="power modes", title_justify="left")
    for col in ("mode", "watts", "GPU max MHz", "bandwidth GB/s", ""):
        t.add_column(col)
    for m in p.power_modes:
        t.add_row(
            m.name, "unconstrained" if m.watts is None else f"{m.watts:g}",
            "-" if m.gpu_max_mhz is None else str(m.gpu_max_mhz), f"{m.bandwidth_gbps:g}",
            "default" if m.name == p.default_power_mode else "",
        )
    c.print(t)
    for s in p.sources:
        c.print(f"  source: {s}")
    if p.notes:
        c.print(f"  note: {p.notes}")


# ---- plan ----------------------------------------------------------------------------------


@app.command("plan")
def plan_cmd(
    model: str = typer.Option("default", "--model", "-m", help="HF checkpoint folder, .gguf file, or 'default' (bundled SmolLM2-135M)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile (default: the one detected here)."),
    context: int = typer.Option(4096, "--context", "-c", help="Tokens per sequence (prompt + answer)."),
    concurrency: int = typer.Option(1, "--concurrency", "-n", help="Sequences served at once."),
    reserve: str = typer.Option("0", "--reserve", help="Memory to leave for your own stack, e.g. 5.5GB or 2GiB."),
    power_mode: Optional[str] = typer.Option(None, "--power-mode", help="Power mode for the headline speed (default: the profile's)."),
    chunks: int = typer.Option(10_000, "--chunks", help="Document chunks the vector index must hold."),
    no_embedder: bool = typer.Option(False, "--no-embedder", help="Plan the generator alone (no embedder, no index)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON for scripts."),
) -> None:
    """Will MODEL fit PROFILE? Memory plan per build option and a recommendation.

    Exits 1 (after printing the plan) when nothing fits.
    """
    from edge.errors import PlanError
    from edge.models.spec import read_spec
    from edge.plan import parse_size, plan_model
    from edge.profiles import detect_profile

    spec = read_spec(model)
    prof_name = profile or detect_profile()
    plan = plan_model(
        spec, prof_name, context=context, concurrency=concurrency, reserve_bytes=parse_size(reserve),
        power_mode=power_mode, index_chunks=chunks, with_embedder=not no_embedder,
    )
    proj = _projection(spec, plan, power_mode)
    if json_out:
        _echo_json({**plan.to_dict(), "projection": proj.to_dict() if proj else None})
    else:
        _print_plan(plan)
        if proj:
            _print_projection(proj)
    if not plan.fits:
        raise PlanError(f"{spec.name or model} does not fit {plan.profile} at {concurrency} x {context} tokens (see the advice above)")


def _projection(spec, plan, power_mode):
    """The cuda backend's projected speed on a Jetson profile (edge.speed), for the recommended
    weights (int4 g128 when nothing is recommended); None elsewhere."""
    from edge.speed import project

    rec = plan.recommendation
    quant, group = (rec.quant, rec.group_size or 128) if rec else ("int4", 128)
    return project(spec, plan.profile, quant, group, power_mode)


def _print_projection(p) -> None:
    a = p.assumptions
    c = _console()
    c.print()
    c.print(_head("projected cuda speed ", f"decode ~{p.decode_tok_s:.0f} tok/s (batch 1, {p.decode_bound}-bound), "
                  f"{p.prefill_tokens}-token prefill ~{p.prefill_ms:,.0f} ms, power mode {p.power_mode}", "bold", 0))
    c.print(f"  scaled from {p.reference}: SM clock ratio {a['sm_clock_ratio']}, tensor rate ratio {a['tensor_rate_ratio']:g},")
    c.print(f"  {a['bandwidth_efficiency']:.0%} of {a['bandwidth_gbps']:g} GB/s assumed. A projection, not a measurement on the device"
            " (model: edge/speed.py, figures: bench/CUDA_NOTES.md).")


def _print_plan(plan) -> None:
    from rich.table import Table

    from edge.profiles import format_size, load_profile

    c = _console()
    prof = load_profile(plan.profile)
    mode = prof.power_mode(plan.power_mode)
    m, b = plan.model, plan.budget
    c.print(_head("model", f"{m['name'] or '?'} ({m['arch']}, {m['n_params'] / 1e6:,.1f}M params, up to {m['max_position']} positions)"))
    c.print(_head("device", f"{prof.name}: {prof.display_name}, power mode {mode.name} ({mode.bandwidth_gbps:g} GB/s)"))
    c.print(_head("request", f"{plan.concurrency} x {plan.context} tokens, your reserve {format_size(plan.reserve_bytes)}"))
    c.print()
    c.print(_head("memory budget", "", width=0))
    lines = [
        ("device memory", b["memory"], ""),
        ("OS reserve", -b["os_reserve"], "profile"),
        ("your reserve", -b["user_reserve"], "--reserve"),
        ("embedding engine", -b["embedder"], "all-MiniLM-L6-v2 fp32"),
        ("embedder activations", -b["embedder_workspace"], "batch 16 x 256 tokens"),
        ("vector index", -b["index"], f"{b['index_chunks']:,} chunks: 384-d float32 + SQLite"),
        ("runtime", -b["runtime_fixed"], "backend, plans, tokenizer"),
        ("decoder activations", -b["workspace"], "one 512-token prefill chunk"),
        ("= left for the generator", b["available_for_model"], "weights + KV cache"),
    ]
    for name, v, note in lines:
        c.print(f"  {name:<26}{format_size(v):>12}   {note}")
    c.print()
    t = Table(title=f"build options for {plan.concurrency} x {plan.context} tokens", title_justify="left")
    # Each KV-dependent cell shows "fp16 KV / int8 KV".
    for col in ("option", "weights", "KV/token KiB", "max context", "max batch", "fits with KV"):
        t.add_column(col, justify="left" if col in ("option", "fits with KV") else "right")
    for mm in prof.power_modes:
        t.add_column(f"tok/s {mm.name}", justify="right")
    for r in plan.options:
        fits = " ".join(d for d in ("fp16", "int8") if r.fits[d]) or ("unsupported" if not r.supported else "no")
        t.add_row(
            r.label, format_size(r.weight_bytes),
            f"{r.kv_bytes_per_token['fp16'] / 1024:.1f} / {r.kv_bytes_per_token['int8'] / 1024:.1f}",
            f"{r.max_context['fp16']} / {r.max_context['int8']}",
            f"{r.max_batch['fp16']} / {r.max_batch['int8']}",
            fits, *[f"{r.decode_tok_s[mm.name]:.0f}" for mm in prof.power_modes],
        )
    c.print(t)
    c.print("  KV columns: fp16 KV / int8 KV. max context: per sequence at the requested concurrency;")
    c.print("  max batch: sequences at the requested context. tok/s: decode upper bound for one sequence")
    c.print("  = bandwidth / weight bytes read per token (empty cache).")
    c.print()
    if plan.recommendation:
        c.print(_head("recommendation", f"  {plan.recommendation.label}   limits: {plan.limits}", "bold green", 0))
    else:
        c.print(_head("nothing fits", "", "bold red", 0))
    c.print(f"  {plan.advice}")


# ---- doctor --------------------------------------------------------------------------------


@app.command("doctor")
def doctor_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """What this machine is, which backends are usable, and which profile applies."""
    from edge.doctor import diagnose
    from edge.profiles import format_size

    d = diagnose()
    if json_out:
        _echo_json(d)
        return
    c = _console()
    mach = d["machine"]
    c.print(_head("machine", f"{mach['kind']}: {mach['platform']} ({mach['arch']}), {mach['cpu_count']} CPUs, {format_size(mach['memory_bytes'])} RAM, Python {mach['python']}"))
    j = d["jetson"]
    if j:
        c.print(_head("jetson", f"{j.get('model') or '?'}; compatible: {', '.join(j['compatible'])}"))
        if j.get("l4t_release"):
            c.print(f"             L4T: {j['l4t_release'].splitlines()[0]}")
    cuda = d["cuda"]
    devs = "; ".join(
        f"{x['name']}" + (f" (CC {x['compute_capability']}, {format_size(x['memory_bytes'])})" if "compute_capability" in x else "")
        for x in cuda["devices"]
    ) or "none"
    c.print(_head("CUDA GPUs", f"{devs}"))
    c.print(_head("CUDA binding", f"{cuda['binding'] or 'none'}" + (f"  ({cuda['error']})" if cuda.get("error") else "")))
    ort = d["onnxruntime"] or {}
    c.print(_head("onnxruntime", (f"{ort['version']}, providers: {', '.join(ort['providers'])}" if "version" in ort else f"unusable ({ort.get('error')})")))
    trt = d["tensorrt"]
    c.print(_head("TensorRT", (trt.get("version") or trt.get("error") if trt else "not installed (ships with JetPack on Jetson)")))
    ok = [k for k, v in d["backends"].items() if v]
    c.print(_head("backends", f"usable: {', '.join(ok) or 'none'}"))
    nat = d["native"]
    c.print(_head("native CPU", (f"`--backend auto` runs int4 / int8 llama-family engines on it ({nat['kernels']} kernels)"
                                 if nat["auto_picks"] else
                                 f"not auto's pick here ({nat['reason'] or 'a GPU backend is usable'}); `--backend native` forces it")))
    enc = d["native_encoder"]
    c.print(_head("embedder", f"int8 bundles embed on the native encoder on this CPU ({enc['kernels']} kernels; "
                              "`--backend onnxruntime`: the graph on onnxruntime)"
                  if enc["cpu_picks"] else f"int8 bundles embed on onnxruntime on this CPU ({enc['reason']})"))
    if "cuda_runtime_probe" in d:
        c.print(_head("cuda probe", f"{d['cuda_runtime_probe']}"))
    c.print(_head("profile", f"{d['profile'] or '?'}" + (f"  ({d['profile_error']})" if d.get("profile_error") else "")
            + ("  (`edge-rag profiles show " + d["profile"] + "`)" if d["profile"] else "")))
    pm = d.get("power_mode")
    if pm:
        planned = f", profile plans {pm['profile_mode']}" if pm.get("profile_mode") else ""
        c.print(_head("power mode", f"{pm['live']} (nvpmodel id {pm.get('live_id')}){planned}"))
        if pm.get("warning"):
            c.print(f"warning: {pm['warning']}")
