"""The results of a `defect-ds bench` sweep: raw JSON, a markdown table with the set-up, a PNG plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

POINT_AXES = ("zero", "accum", "micro_batch", "checkpointing", "latents", "unet_mode", "lora_rank")
ZERO_NAMES = {"0": "0 (plain DP)", "3o": "3 + offload"}


def write_results(results: list[dict[str, Any]], info: dict[str, Any], out: str | Path) -> None:
    """Writes OUT.json, OUT.md and OUT.png (OUT is a path without suffix; a dot in it, as in
    `...-reserve-0.75`, is part of the name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png, md = (out.with_name(out.name + suffix) for suffix in (".json", ".png", ".md"))
    json_path.write_text(json.dumps({"environment": info, "points": results}, indent=1) + "\n")
    write_plot(results, info, png)
    md.write_text(markdown(results, info, png.name))


# ---- the table ----------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def unet_label(point: dict[str, Any]) -> str:
    """`full`, or `LoRA` with its rank when the sweep set one (results from before the axis are LoRA)."""
    if point.get("unet_mode", "lora") == "full":
        return "full"
    return f"LoRA r{point['lora_rank']}" if point.get("lora_rank") else "LoRA"


def rank_memory(r: dict[str, Any]) -> str:
    """Each rank's peak resident GiB as the sweep read it ("a / b"); older results have rank 0's only."""
    ranks = (r.get("memory") or {}).get("rank_peak_rss_gib")
    if ranks:
        return " / ".join(f"{g:.3g}" for g in ranks)
    return _num(r["metrics"].get("cpu_max_rss_gib"))


def table_rows(results: list[dict[str, Any]], cuda: bool, processes: int) -> list[str]:
    memory = "peak alloc / reserved GiB" if cuda else "peak RSS per rank GiB"
    header = ["point", "ZeRO", "UNet", "accum", "micro batch", "global batch", "act. ckpt", "latents", "images/s",
              "(min-max)", "step s", "TFLOP/s/dev", "MFU", "HFU", "GFLOP/img", "data wait", memory,
              "ckpt MiB", "ckpt save s", "load 1 min", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * 8 + [" ---: "] * 12 + [" --- "]) + "|"]
    for r in results:
        p, m = r["point"], r["metrics"]
        mem = (f"{_num(m.get('peak_mem_alloc_gib'))} / {_num(m.get('peak_mem_reserved_gib'))}" if cuda
               else rank_memory(r))
        spread = (f"{m['images_per_s_min']:.3g}-{m['images_per_s_max']:.3g}" if m else "-")
        status = "ok" if r["status"] == "ok" else f"**{r['status']}**: {r['error']}"
        saved = r.get("checkpoint") or {}
        lines.append("| " + " | ".join([
            f"`{r['name']}`", ZERO_NAMES.get(p["zero"], p["zero"]), unet_label(p), str(p["accum"]),
            str(p["micro_batch"]), str(p["micro_batch"] * p["accum"] * processes),
            "on" if p["checkpointing"] else "off",
            "on" if p["latents"] else "off", _num(m.get("images_per_s")), spread, _num(m.get("step_time_s")),
            _num(m.get("tflops_per_device")), _pct(m.get("mfu")), _pct(m.get("hfu")),
            _num(m.get("model_gflop_per_image")), _pct(m.get("data_wait_share")), mem,
            _num(saved.get("mib")), _num(saved.get("save_s")), " / ".join(f"{x:.1f}" for x in r.get("load_avg_1min", [])) or "-", status.replace("|", "/"),
        ]) + " |")
    return lines


def config_diff(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`section.field: value` for every field of `other` that differs from `base`."""
    diff = {}
    for section, fields in other.items():
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if base.get(section, {}).get(key) != value:
                diff[f"{section}.{key}"] = value
    return diff


def markdown(results: list[dict[str, Any]], info: dict[str, Any], plot_name: str) -> str:
    cuda = info.get("accelerator") == "cuda"
    plan = info.get("plan", {})
    steps = results[0]["measured_steps"] if results else ["?", "?"]
    libs = ", ".join(f"{lib} {info[lib]}" for lib in ("torch", "deepspeed", "diffusers", "peft", "transformers",
                                                       "webdataset") if info.get(lib))
    device = info["device"] + (f" ({info.get('device_memory_gib')} GiB, CUDA {info.get('cuda')})" if cuda else
                               f" ({info.get('host_cores')} cores available to this machine)")
    cpu_peak = info.get("cpu_peak_tflops")
    peak = (f"MFU and HFU against this CPU's measured matmul peak per rank (fp32 {cpu_peak['fp32']}, bf16 "
            f"{cpu_peak['bf16']} TFLOP/s on {cpu_peak['threads']} thread(s); each rank measures its precision's "
            "peak at start-up, `defect_ds/perf/cpu_peak.py`)" if cpu_peak and not cuda else
            f"MFU and HFU against a dense bf16 peak of {info['peak_tflops']} TFLOP/s per device"
            if info.get("peak_tflops") else "no peak-FLOPs figure for this device, so MFU and HFU are not "
            "defined; TFLOP/s per device is the comparable figure")
    ok = [r for r in results if r["status"] == "ok"]
    lines = [
        f"# Training sweep: {info.get('arch')} model, {plan.get('resolution_px')} px, "
        f"{'GPU' if cuda else 'CPU'}, {info['date']}",
        "",
        f"Command: `{info.get('command')}`",
        "",
        f"- device: {device}; {info['processes']} training process{'es' if info['processes'] > 1 else ''} per "
        f"point (`deepspeed --num_gpus {info['processes']}`{'' if cuda else ', DS_ACCELERATOR=cpu'})",
        f"- python {info['python']}, {libs}",
        f"- model `{plan.get('model_dir')}` ({info.get('arch')}), data `{plan.get('images_dir')}` "
        f"(latent points: `{plan.get('latents_dir')}`), precision `{plan.get('precision')}`",
        f"- measured: optimizer steps {steps[0]}-{steps[1]} of each run ({plan.get('measure_intervals')} log "
        f"intervals of {plan.get('interval_steps')} steps; the first {plan.get('warmup_intervals')} interval(s) are "
        "warm-up and not counted). images/s counts all processes; rates are total work over total time of the "
        "measured intervals, (min-max) the spread between them",
        f"- {peak}; GFLOP/img is the model FLOPs the meter counts per image (`defect_ds/perf/flops.py`: no VAE "
        "encoder with latents; recompute only in HFU); data wait is the share of time rank 0 waited for batches",
        "- memory: " + ("the CUDA caching allocator's peak allocated / reserved on rank 0 over the measured "
                        "intervals" if cuda else "each rank's peak resident set size over its whole life (the "
                        "kernel's VmHWM, read twice a second; the CPU has no allocator statistics). A point "
                        f"that would leave less than {plan.get('memory_reserve_gib', '-')} GiB of the machine's "
                        "memory free is stopped and marked **does not fit**, with what it reached"),
        f"- load 1 min: the host's 1-minute load average before / after each point{'' if cuda else ' (on a shared CPU, other jobs lower the figures)'}",
        "",
        *table_rows(results, cuda, info["processes"]),
        "",
    ]
    if ok:
        best = max(ok, key=lambda r: r["metrics"]["images_per_s"])
        lines += [f"Fastest: `{best['name']}` at {best['metrics']['images_per_s']:.3g} images/s.", ""]
    lines += [f"![images/s and {'MFU' if info.get('peak_tflops') else 'TFLOP/s'} per point]({plot_name})", ""]
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["## Points that failed or did not fit", ""] + [f"- `{r['name']}`: {r['error']} (log: `{r['run_dir']}/launcher.log`)"
                                             for r in failed] + [""]
    traces = [r for r in results if r.get("profile_trace")]
    if traces:
        lines += ["## Profiler traces", ""] + [
            f"- `{r['name']}`: `{r['profile_trace']}` (one unmeasured interval after the measured ones; open in "
            "chrome://tracing or ui.perfetto.dev)" for r in traces] + [""]
    configs = [r for r in results if r.get("config")]
    if configs:
        base = configs[0]
        lines += ["## Resolved configs", "",
                  f"Full resolved run config of `{base['name']}` (its `config.json`); every other point differs "
                  "from it only in the fields listed below it.", "", "```json",
                  json.dumps(base["config"], indent=2), "```", ""]
        for r in configs[1:]:
            diff = config_diff(base["config"], r["config"])
            lines.append(f"- `{r['name']}`: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in diff.items()))
        lines += ["", "DeepSpeed engine files (micro batch, accumulation and train batch are injected from the "
                  "run config):", ""]
        for zero, engine in info.get("engine_configs", {}).items():
            lines += [f"ZeRO {zero}:", "", "```json", json.dumps(engine, indent=2), "```", ""]
    lines += ["## Commands", "", "Each point's launch, to re-run one alone:", ""]
    lines += [f"- `{r['name']}`: `{r['command']}`" for r in results] + [""]
    return "\n".join(lines)


# ---- the plot -----------------------------------------------------------------------------------
def write_plot(results: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    """Horizontal bars per point: images/s, and MFU (or TFLOP/s per device without a peak figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    ips = [r["metrics"].get("images_per_s") or 0.0 for r in results]
    use_mfu = bool(info.get("peak_tflops"))
    key, label = ("mfu", "MFU (%)") if use_mfu else ("tflops_per_device", "model TFLOP/s per device")
    second = [(r["metrics"].get(key) or 0.0) * (100 if use_mfu else 1) for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.42 * max(1, len(results))), sharey=True)
    spread = [[v - (r["metrics"].get("images_per_s_min") or v) for v, r in zip(ips, results)],
              [(r["metrics"].get("images_per_s_max") or v) - v for v, r in zip(ips, results)]]
    colors = ["tab:blue" if r["status"] == "ok" else "lightgray" for r in results]
    for ax, values, title, err in ((axes[0], ips, "images/s (all processes; bars: interval spread)", spread),
                                   (axes[1], second, label, None)):
        ax.barh(range(len(results)), values, color=colors, xerr=err, capsize=3)
        for i, (r, v) in enumerate(zip(results, values)):
            text = f" {v:.3g}" if r["status"] == "ok" else f"  {r['status']}"
            ax.text(v + (err[1][i] if err else 0) if r["status"] == "ok" else 0, i, text, va="center", fontsize=8,
                    color="black" if r["status"] == "ok" else "tab:red")
        ax.margins(x=0.15)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(results)), names, fontsize=8, family="monospace")
    axes[0].invert_yaxis()
    fig.suptitle(f"{info.get('arch')} @ {info.get('plan', {}).get('resolution_px')} px on {info['device']}, "
                 f"{info['processes']} process(es), {info['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
