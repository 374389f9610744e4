"""Merge a results folder's parts into results.json, results.md and (with matplotlib) results.png.

    python -m misotts.bench.report bench/results/<date>-<device>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from misotts.runtime.audio import FRAME_MS

from .stats import format_first_audio

OURS = ("engine", "reference")  # the targets judge the first of these that was measured
PEERS = ("transformers", "transformers-static")


def load_parts(folder: Path) -> list[dict]:
    parts = []
    for path in sorted(Path(folder).glob("part-*.json")):
        part = json.loads(path.read_text())
        if part.get("kind") == "misotts-bench-part":
            parts.append(part)
    return parts


def merge(parts: list[dict]) -> dict:
    """One entry per model: the first part's setup and floors, every part's systems (each with the
    plan it ran under) and errors."""
    models = {}
    for part in parts:
        m = models.setdefault(part["model"], {**part, "systems": {}, "errors": {}, "bandwidth_runs_gbps": []})
        m["bandwidth_runs_gbps"].append(part["bandwidth_gbps"])
        for name, res in part["systems"].items():
            m["systems"][name] = {**res, "plan": part["plan"]}
        m["errors"].update(part["errors"])
    codes = [p["code"] for p in parts if p.get("code")]
    return {"devices": sorted({p["device"] for p in parts}), "code": codes[0] if codes else None,
            "codes_differ": len({(c["commit"], c["dirty"]) for c in codes}) > 1, "models": models}


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return None
        d = d[k]
    return d


def ours(model: dict) -> str | None:
    return next((s for s in OURS if s in model["systems"]), None)


def targets(merged: dict) -> list[dict]:
    """Each target: what, the system judged, the measured value, and pass / FAIL / not measured."""
    models, out = merged["models"], []

    def add(what, model, value, ok, fmt, needs):
        m = models.get(model)
        if m is None or m["device_type"] != needs:
            status, shown, system = f"not measured (needs {model} on {needs})", "", ""
        elif value is None:
            status, shown, system = "not measured", "", ours(m) or ""
        else:
            status, shown, system = ("pass" if ok(value) else "FAIL"), fmt.format(value), ours(m)
        out.append({"target": what, "model": model, "system": system, "value": shown, "status": status,
                    "device": m["device"] if m else ""})

    def of(model, *keys):
        m = models.get(model)
        return _get(m["systems"].get(ours(m)), *keys) if m and ours(m) else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    m8, m1 = models.get("miso-8b"), models.get("csm-1b")
    add("miso-8b bf16, 1 stream: time to first audio <= 25 ms", "miso-8b", of("miso-8b", "short", "ttfa_ms"),
        lambda v: v <= 25, "{:.1f} ms", "cuda")
    add("miso-8b bf16, 1 stream: per-frame latency <= 1.3 x floor", "miso-8b",
        ratio(of("miso-8b", "short", "frame_ms"), _get(m8, "floors", "short", "frame_ms")),
        lambda v: v <= 1.3, "{:.2f} x floor", "cuda")
    add("csm-1b: real-time factor <= 0.05", "csm-1b", of("csm-1b", "short", "rtf"), lambda v: v <= 0.05, "{:.3f}",
        "cuda")
    add("csm-1b: per frame >= 10x faster than transformers' fastest mode", "csm-1b",
        ratio(fastest_peer(m1), of("csm-1b", "short", "frame_ms")), lambda v: v >= 10, "{:.1f}x", "cuda")
    for model in [name for name in ("csm-1b", "miso-8b") if name in models] or ["csm-1b"]:
        add(f"{model}: 16 streams >= 8x the throughput of one", model,
            ratio(of(model, "throughput", "16", "audio_s_per_s"), of(model, "throughput", "1", "audio_s_per_s")),
            lambda v: v >= 8, "{:.1f}x", "cuda")
    tiny = models.get("tiny")
    engine_frame = _get(tiny, "systems", "engine", "short", "frame_ms")
    add("CPU, tiny: engine >= 10x faster per frame than transformers", "tiny",
        ratio(fastest_peer(tiny), engine_frame), lambda v: v >= 10, "{:.1f}x", "cpu")
    return out


def fastest_peer(model: dict | None) -> float | None:
    frames = [_get(model, "systems", p, "short", "frame_ms") for p in PEERS] if model else []
    frames = [f for f in frames if f is not None]
    return min(frames) if frames else None


def _fmt(v, spec="{:.1f}"):
    return "–" if v is None else spec.format(v)


def code_line(code: dict | None) -> str:
    if not code or not code.get("commit"):
        return "Code measured: unknown (no git commit recorded)."
    state = {True: "with uncommitted changes", False: "clean tree", None: "tree state unknown"}[code.get("dirty")]
    return f"Code measured: commit {code['commit'][:12]} ({state})."


def markdown(merged: dict, checks: list[dict]) -> str:
    lines = [f"# MisoTTS benchmark — {', '.join(merged['devices'])}", "", code_line(merged.get("code")), ""]
    if merged.get("codes_differ"):
        lines += ["**The parts of this folder measured different code.**", ""]
    for name, m in merged["models"].items():
        streams = sorted({int(s) for r in m["systems"].values() for s in r.get("throughput", {})}) or \
            sorted(int(s) for s in m["floors"]["throughput"])
        p = m["prompts"]
        lines += [f"## {name} ({m['parameters'] / 1e6:,.0f} M parameters, {m['dtype']}, seeded random weights)", "",
                  "Prompt positions: " + ", ".join(f"{k} {v['positions']}" for k, v in p.items())
                  + f". Copy bandwidth {m['bandwidth_gbps']:.1f} GB/s, matmul {m['matmul_tflops']:.2f} TFLOP/s; "
                  f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}"
                  + (f", load average {m['load_average'][0]:.1f}" if m.get("load_average") else "") + ".", "",
                  "| system | time to first audio, ms (short / context / follow-up) | first codes, ms (short) "
                  "| per frame, ms: median (p90) | real-time factor | audio s/s"
                  + (" at " + " / ".join(map(str, streams)) + " streams" if streams else "")
                  + " | real-time streams (TTFA p50 / p99 at that load, ms) | peak GPU GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for sys_name, r in m["systems"].items():
            ttfa = " / ".join(_fmt(_get(r, w, "ttfa_ms")) for w in ("short", "context", "follow-up"))
            tput = " / ".join(_fmt(_get(r, "throughput", str(s), "audio_s_per_s"), "{:.2f}") for s in streams) or "–"
            frame = f"{_fmt(_get(r, 'short', 'frame_ms'))} ({_fmt(_get(r, 'short', 'frame_p90_ms'))})"
            lines.append(f"| {sys_name} | {ttfa} | {_fmt(_get(r, 'short', 'first_codes_ms'))} | {frame} | "
                         f"{_fmt(_get(r, 'short', 'rtf'), '{:.3f}')} | {tput} | {realtime_cell(r.get('realtime'))} | "
                         f"{_fmt(r.get('peak_mem_gib'), '{:.2f}')} |")
        f = m["floors"]
        ttfa = " / ".join(_fmt(_get(f, w, "ttfa_ms"), "{:.2f}") for w in ("short", "context", "follow-up"))
        tput = " / ".join(_fmt(_get(f, "throughput", str(s)), "{:.0f}") for s in streams)
        rtf = _get(f, "short", "frame_ms")
        lines.append(f"| *floor* | {ttfa} | | {_fmt(_get(f, 'short', 'frame_ms'), '{:.2f}')} | "
                     f"{_fmt(rtf and rtf / FRAME_MS, '{:.4f}')} | {tput} | | |")
        lines += [""] + ratio_lines(m) + load_lines(m)
        for sys_name, err in m["errors"].items():
            lines.append(f"- {sys_name} failed: `{err}`")
        lines.append("")
    lines += ["## Targets", "", "| target | system | measured | result | device |", "|---|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['system']} | {c['value']} | {c['status']} | {c['device']} |" for c in checks]
    return "\n".join(lines) + "\n"


def realtime_cell(rt: dict | None) -> str:
    """"16 (12.0 / 30.5)"; a "≥" when the search stopped before it could tell."""
    if not rt:
        return "–"
    n = f"{'' if rt.get('exact') else '≥ '}{rt['streams']}"
    if not rt["streams"]:  # its arrivals were timed into an idle engine, not at a load
        return n
    return f"{n} ({_fmt(rt.get('ttfa_p50_ms'))} / {_fmt(rt.get('ttfa_p99_ms'))})"


def load_lines(m: dict) -> list[str]:
    """Under the table: each system's first-audio breakdown, its throughput runs' spread, and the
    real-time search's result with the per-stream gaps it was judged on."""
    lines = []
    for name, r in m["systems"].items():
        for w in ("short", "context"):
            parts = _get(r, w, "first_audio_ms")
            if parts:
                lines.append(f"- {name} {w}: {format_first_audio(parts)} (medians from submit)")
        tput = r.get("throughput") or {}
        if tput:
            spread = ", ".join(f"{n}: {_fmt(v.get('audio_s_per_s_min'), '{:.2f}')}–"
                               f"{_fmt(v.get('audio_s_per_s_max'), '{:.2f}')}"
                               f" (p99 gap {_fmt(v.get('worst_gap_p99_ms'))} ms)"
                               for n, v in sorted(tput.items(), key=lambda kv: int(kv[0])))
            method = next(iter(tput.values())).get("method", "wall time")
            lines.append(f"- {name} throughput ({method}, {len(next(iter(tput.values())).get('runs', [])) or 1} "
                         f"run(s) per level, min–max audio s/s, worst stream's p99 gap): {spread}")
        rt = r.get("realtime")
        if rt:
            state = "exact" if rt.get("exact") else f"a lower bound (stopped: {rt.get('stopped')})"
            tried = ", ".join(f"{n} {'pass' if ok else 'fail'}" for n, ok, _ in rt.get("tried", [])) or "none"
            line = (f"- {name} real-time streams: {rt['streams']} of {rt['cap']} lanes ({state}; first fail "
                    f"{rt.get('first_fail') or '–'}; tried beyond the levels: {tried}; {rt['search_s']:.1f} s)")
            gaps = rt.get("gap_p99_ms")
            if gaps:
                line += f"; per-stream p99 gaps {min(gaps):.1f}–{max(gaps):.1f} ms"
            if rt.get("ttfa_ms"):
                line += (f"; {rt['arrivals']} arrival(s) into {rt['background']} running: TTFA p50 "
                         f"{rt['ttfa_p50_ms']:.1f} / p99 {rt['ttfa_p99_ms']:.1f} ms")
            lines.append(line)
            if rt.get("first_audio_ms"):
                at = f"{rt['background']} running" if rt["background"] else "an idle engine"
                lines.append(f"- {name}, arrivals into {at}: {format_first_audio(rt['first_audio_ms'])} "
                             f"(medians from submit)")
    return lines


def ratio_lines(m: dict) -> list[str]:
    """How many times slower each other system is than ours, and ours against its floor."""
    best, lines = ours(m), []
    if best is None:
        return lines
    r = m["systems"][best]
    for name, other in m["systems"].items():
        if name == best:
            continue
        parts = []
        for label, keys in (("per frame", ("short", "frame_ms")), ("first audio", ("short", "ttfa_ms")),
                            ("first audio with context", ("context", "ttfa_ms"))):
            a, b = _get(other, *keys), _get(r, *keys)
            if a is not None and b:
                parts.append(f"{label} {a / b:.1f}x")
        if parts:
            lines.append(f"- {name} vs {best}: " + ", ".join(parts) + " (time ratio; > 1: " + best + " is faster)")
    for w in ("short", "context"):
        a, b = _get(r, w, "frame_ms"), _get(m, "floors", w, "frame_ms")
        if a is not None and b:
            lines.append(f"- {best} per frame ({w}) = {a / b:.1f}x the bandwidth floor")
    return lines


def plot(merged: dict, path: Path) -> Path | None:
    """Latency breakdown per system and throughput against concurrency; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = merged["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.8 * len(models)), squeeze=False)
    for (name, m), (ax_lat, ax_tp) in zip(models.items(), axes):
        systems = list(m["systems"])
        first = [_get(m["systems"][s], "short", "first_codes_ms") or 0 for s in systems]
        ttfa = [_get(m["systems"][s], "short", "ttfa_ms") or 0 for s in systems]
        frame = [_get(m["systems"][s], "short", "frame_ms") or 0 for s in systems]
        y = range(len(systems))
        up, down = [i + 0.2 for i in y], [i - 0.2 for i in y]
        ax_lat.barh(up, first, height=0.4, label="prompt, prefill, first frame (codes on host)")
        ax_lat.barh(up, [max(t - f, 0) for t, f in zip(ttfa, first)], height=0.4, left=first,
                    label="first Mimi decode, PCM on host")
        ax_lat.barh(down, frame, height=0.4, label="each later frame (median)")
        ax_lat.axvline(_get(m, "floors", "short", "ttfa_ms") or 0, color="k", ls="--", lw=1, label="first-audio floor")
        ax_lat.axvline(_get(m, "floors", "short", "frame_ms") or 0, color="gray", ls=":", lw=1, label="frame floor")
        ax_lat.set_yticks(list(y), systems)
        ax_lat.set_xscale("log")
        lows = [v for v in (_get(m, "floors", "short", "frame_ms"), *first, *frame) if v]
        ax_lat.set_xlim(left=min(lows) / 2)
        ax_lat.set_xlabel("ms (log)")
        ax_lat.set_title(f"{name}: latency, short prompt")
        ax_lat.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
        if not m["floors"]["throughput"]:
            ax_tp.set_axis_off()
            ax_tp.set_title(f"{name}: throughput not measured")
            continue
        for s in systems:
            tp = m["systems"][s].get("throughput", {})
            xs = sorted(int(k) for k in tp)
            ax_tp.plot(xs, [tp[str(x)]["audio_s_per_s"] for x in xs], marker="o", label=s)
        ceiling = m["floors"]["throughput"]
        xs = sorted(int(k) for k in ceiling)
        ax_tp.plot(xs, [ceiling[str(x)] for x in xs], "k--", lw=1, label="bandwidth ceiling")
        ax_tp.set_xscale("log", base=2)
        ax_tp.set_yscale("log")
        ax_tp.set_xlabel("concurrent streams")
        ax_tp.set_ylabel("audio seconds per second")
        ax_tp.set_title(f"{name}: throughput")
        ax_tp.legend(fontsize=7)
    fig.suptitle(", ".join(merged["devices"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder) -> str:
    """Write results.json / results.md / results.png in `folder`; return the Markdown."""
    folder = Path(folder)
    parts = load_parts(folder)
    if not parts:
        raise FileNotFoundError(f"no benchmark parts (part-*.json) in {folder}")
    merged = merge(parts)
    merged["targets"] = targets(merged)
    md = markdown(merged, merged["targets"])
    (folder / "results.json").write_text(json.dumps(merged, indent=1))
    (folder / "results.md").write_text(md)
    png = plot(merged, folder / "results.png")
    note = f"wrote {folder}/results.json, results.md"
    note += ", results.png" if png else " (no plot: pip install matplotlib)"
    print(note, file=sys.stderr)
    return md


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_report(sys.argv[1]))
