"""The results writer: valid JSON and Markdown with the expected rows, and the targets' verdicts."""
import json

from misotts.bench.report import write_report


def system(frame_ms, ttfa_ms, rtf, tput):
    wl = {"frames": 8, "first_codes_ms": ttfa_ms / 2, "frame_ms": frame_ms, "frame_p90_ms": frame_ms * 1.1,
          "ttfa_ms": ttfa_ms, "ttfa_runs_ms": [ttfa_ms], "rtf": rtf, "audio_frame_ms": frame_ms}
    return {"short": wl, "context": dict(wl, ttfa_ms=2 * ttfa_ms), "follow-up": {"ttfa_ms": 3 * ttfa_ms},
            "peak_mem_gib": 3.5, "throughput": {str(n): {"audio_s_per_s": v, "wall_s": 1.0, "peak_mem_gib": 4.0}
                                                for n, v in tput.items()}}


def part(model, device_type, systems, errors=None):
    return {"kind": "misotts-bench-part", "model": model, "device": "Test GPU", "device_type": device_type,
            "dtype": "bfloat16", "date": "2026-01-01T00:00:00", "torch": "2", "transformers": "5", "seed": 0,
            "parameters": 1_500_000_000, "plan": {"frames": 8}, "bandwidth_gbps": 3000.0, "matmul_tflops": 700.0,
            "prompts": {"short": {"positions": 30}, "context": {"positions": 342}, "follow-up": {"positions": 373}},
            "floors": {"short": {"frame_ms": 2.0, "ttfa_ms": 3.0}, "context": {"frame_ms": 2.1, "ttfa_ms": 5.0},
                       "follow-up": {"frame_ms": 2.1, "ttfa_ms": 5.5}, "throughput": {"1": 40.0, "16": 600.0}},
            "systems": systems, "errors": errors or {}}


def test_report_merges_parts_and_judges_targets(tmp_path):
    first = part("csm-1b", "cuda", {"reference": system(30.0, 80.0, 0.5, {1: 2.0, 16: 10.0}),
                                     "engine": system(3.0, 20.0, 0.04, {1: 25.0, 16: 300.0}),
                                     "transformers": system(100.0, 300.0, 1.5, {1: 0.8, 16: 5.0})})
    second = part("csm-1b", "cuda", {}, errors={"transformers-static": "TimeoutError: compile"})
    (tmp_path / "part-csm-1b-a.json").write_text(json.dumps(first))
    (tmp_path / "part-csm-1b-b.json").write_text(json.dumps(second))
    (tmp_path / "unrelated.json").write_text("{}")

    md = write_report(tmp_path)

    merged = json.loads((tmp_path / "results.json").read_text())
    assert list(merged["models"]) == ["csm-1b"] and set(merged["models"]["csm-1b"]["systems"]) == \
        {"reference", "engine", "transformers"}
    assert (tmp_path / "results.md").read_text() == md
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert {"reference", "engine", "transformers", "*floor*"} <= set(rows)
    assert "| engine | 20.0 / 40.0 / 60.0 | 10.0 | 3.0 (3.3) | 0.040 | 25.00 / 300.00 |" in md
    assert "transformers vs engine: per frame 33.3x" in md
    assert "transformers-static failed: `TimeoutError: compile`" in md
    verdicts = {t["target"]: (t["value"], t["status"]) for t in merged["targets"]}
    assert verdicts["csm-1b: real-time factor <= 0.05"] == ("0.040", "pass")
    assert verdicts["csm-1b: per frame >= 10x faster than transformers' fastest mode"] == ("33.3x", "pass")
    assert verdicts["csm-1b: 16 streams >= 8x the throughput of one"] == ("12.0x", "pass")
    assert verdicts["miso-8b bf16, 1 stream: time to first audio <= 25 ms"][1].startswith("not measured")


def test_failing_target_and_cpu_target(tmp_path):
    tiny = part("tiny", "cpu", {"engine": system(50.0, 100.0, 2.0, {1: 0.1, 16: 0.5}),
                                "transformers": system(150.0, 300.0, 5.0, {1: 0.05, 16: 0.2})})
    (tmp_path / "part-tiny.json").write_text(json.dumps(tiny))
    write_report(tmp_path)
    verdicts = {t["target"]: (t["value"], t["status"])
                for t in json.loads((tmp_path / "results.json").read_text())["targets"]}
    assert verdicts["CPU, tiny: engine >= 10x faster per frame than transformers"] == ("3.0x", "FAIL")


def test_report_names_the_code_measured(tmp_path):
    code = {"commit": "c0ffee" * 6 + "abcd", "dirty": True, "source": "git"}
    (tmp_path / "part-tiny-a.json").write_text(json.dumps({**part("tiny", "cpu", {}), "code": code}))
    md = write_report(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["code"] == code
    assert "Code measured: commit c0ffeec0ffee (with uncommitted changes)." in md
    other = {**code, "dirty": False}
    (tmp_path / "part-tiny-b.json").write_text(json.dumps({**part("tiny", "cpu", {}), "code": other}))
    assert "measured different code" in write_report(tmp_path)


def test_report_without_a_recorded_commit_says_so(tmp_path):
    (tmp_path / "part-tiny-a.json").write_text(json.dumps(part("tiny", "cpu", {})))
    assert "Code measured: unknown" in write_report(tmp_path)


def test_report_shows_realtime_streams_first_audio_and_spread(tmp_path):
    engine = system(3.0, 20.0, 0.04, {1: 25.0, 16: 300.0})
    engine["short"]["first_audio_ms"] = {"queue": 0.1, "prefill": 12.0, "first_frame": 27.0,
                                         "audio_decode": float("nan"), "hand_off": 0.2, "total": 46.5}
    for level in engine["throughput"].values():
        level.update(method="steady", audio_s_per_s_min=20.0, audio_s_per_s_max=30.0, worst_gap_p99_ms=50.0,
                     runs=[{}, {}, {}])
    engine["realtime"] = {"streams": 12, "cap": 64, "exact": True, "first_fail": 13, "stopped": "",
                          "tried": [[32, False, 120.0], [12, True, 79.0]], "search_s": 4.5,
                          "gap_p99_ms": [70.0, 79.0], "ttfa_ms": [30.0, 41.0], "ttfa_p50_ms": 35.5,
                          "ttfa_p99_ms": 40.9, "arrivals": 2, "background": 11,
                          "first_audio_ms": {"queue": 2.0, "total": 35.0}}
    (tmp_path / "part-csm-1b.json").write_text(json.dumps(part("csm-1b", "cuda", {"engine": engine})))
    md = write_report(tmp_path)
    assert "| engine | 20.0 / 40.0 / 60.0 | 10.0 | 3.0 (3.3) | 0.040 | 25.00 / 300.00 | 12 (35.5 / 40.9) | 3.50 |" in md
    assert ("- engine short: first audio 46.5 ms = queue 0.1 + prefill 12.0 + first frame 27.0 + audio - + "
            "hand-off 0.2 (medians from submit)") in md
    assert "- engine throughput (steady, 3 run(s) per level" in md and "16: 20.00–30.00 (p99 gap 50.0 ms)" in md
    assert ("- engine real-time streams: 12 of 64 lanes (exact; first fail 13; tried beyond the levels: 32 fail, "
            "12 pass; 4.5 s); per-stream p99 gaps 70.0–79.0 ms; 2 arrival(s) into 11 running: TTFA p50 35.5 / "
            "p99 40.9 ms") in md
    assert ("- engine, arrivals into 11 running: first audio 35.0 ms = queue 2.0 + prefill - + first frame - + "
            "audio - + hand-off - (medians from submit)") in md
    engine["realtime"].update(exact=False, stopped="time")
    (tmp_path / "part-csm-1b.json").write_text(json.dumps(part("csm-1b", "cuda", {"engine": engine})))
    assert "| ≥ 12 (35.5 / 40.9) |" in write_report(tmp_path)
