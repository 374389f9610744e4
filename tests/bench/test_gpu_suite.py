"""The GPU suite's runner (bench/suite_runner.sh) with stand-in steps: each step's limit follows from
one budget so the suite ends inside it, failures and timeouts are recorded and the next step runs,
and the results come back even when the suite is killed.  (The suite's real steps are rehearsed on
the CPU by `bash bench/gpu_suite.sh --dry-run`, which CI runs.)"""
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "bench" / "suite_runner.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def write_suite(tmp_path, steps: str) -> Path:
    script = tmp_path / "suite.sh"
    script.write_text(f'source "{RUNNER}"\nsuite_start "$1" "$2"\n{steps}\nsuite_end\n')
    return script


def start(script, tmp_path, **env):
    settings = {"BUDGET": "8", "RESERVE": "1", "GRACE": "1", "MIN_STEP": "1", **env}
    return subprocess.Popen(["bash", str(script), str(tmp_path / "res"), str(tmp_path / "ret")],
                            env={**os.environ, **settings}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def archived(tmp_path) -> dict[str, str]:
    with tarfile.open(tmp_path / "ret" / "gpu-suite.tgz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_limits_follow_one_budget_and_every_step_is_recorded(tmp_path):
    script = write_suite(tmp_path, """
step fast 20 bash -c 'echo fast ran'
step slow 30 sleep 60
step fails 20 bash -c 'echo broken; exit 3'
step refuses 20 bash -c 'exit 2'
step rest 100 sleep 60
step late 100 sleep 60
""")
    proc = start(script, tmp_path, BUDGET="10")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out  # some step failed
    log = (tmp_path / "res" / "suite.log").read_text()
    verdicts = dict(re.findall(r"^== ([a-z]+): (passed|FAILED|TIMED OUT|SKIPPED)", log, re.M))
    assert verdicts == {"fast": "passed", "slow": "TIMED OUT", "fails": "FAILED", "refuses": "FAILED",
                        "rest": "TIMED OUT", "late": "SKIPPED"}, log
    assert "== fails: FAILED (exit 3)" in log
    # Each limit: its share of BUDGET - RESERVE (9 s), never more than is left; every step ends
    # (limit + grace) before the reserve, whatever the steps do.
    limits = {name: (int(limit), int(at)) for name, limit, at in re.findall(r"^== (\w+) \(limit (-?\d+) s\) at (\d+) s",
                                                                           log, re.M)}
    assert limits["slow"][0] == 9 * 30 // 100 and limits["fails"][0] == 9 * 20 // 100
    assert all(at + limit + 1 <= 10 - 1 for limit, at in limits.values()), log
    done_at = int(re.search(r"^== suite: done at (\d+) s of 10", log, re.M).group(1))
    assert done_at <= 10
    # Results: every step's log in the results folder and in the archive; three files to return.
    files = archived(tmp_path)
    assert files["fast.log"] == "fast ran\n" and files["fails.log"] == "broken\n"
    assert {"suite.log", "slow.log", "rest.log"} <= set(files)
    assert sorted(os.listdir(tmp_path / "ret")) == ["gpu-suite.tgz", "suite.log"]
    assert (tmp_path / "ret" / "suite.log").read_text() == log


def test_steps_can_be_picked_and_functions_run_under_the_limit(tmp_path):
    script = write_suite(tmp_path, """
name() { echo "$1"; }
greet() { echo "hello $(name "$1") from $RES"; }
step one 50 greet world
step two 50 bash -c 'echo two'
""")
    proc = start(script, tmp_path, STEPS="one")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "res" / "one.log").read_text() == f"hello world from {tmp_path / 'res'}\n"
    assert not (tmp_path / "res" / "two.log").exists()
    assert "== two: not in STEPS" in (tmp_path / "res" / "suite.log").read_text()


@pytest.mark.parametrize("strict", [False, True])
def test_a_step_left_without_time_fails_the_suite_only_when_asked(tmp_path, strict):
    script = write_suite(tmp_path, "step starved 100 bash -c 'echo ran'\n")
    proc = start(script, tmp_path, BUDGET="3", MIN_STEP="2", **({"SKIPPED_FAILS": "1"} if strict else {}))
    out, _ = proc.communicate(timeout=60)
    assert "== starved: SKIPPED" in out and not (tmp_path / "res" / "starved.log").exists()
    assert proc.returncode == (1 if strict else 0), out


def kill_session(sid: int) -> None:
    """Whatever the killed suite left running (a step outlives a SIGKILLed shell)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_suite_still_returns_what_it_made(tmp_path, sig):
    script = write_suite(tmp_path, """
step first 30 bash -c 'echo first done'
step long 60 bash -c 'echo started; exec sleep 60'
step never 10 bash -c 'echo never'
""")
    proc = start(script, tmp_path, BUDGET="60", GRACE="2")
    live = tmp_path / "ret" / "current.log"
    try:
        deadline = time.monotonic() + 30
        while not (live.exists() and "started" in live.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the long step never started"
            time.sleep(0.1)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        kill_session(proc.pid)
    files = archived(tmp_path)
    assert files["first.log"] == "first done\n"
    if sig == signal.SIGTERM:  # the trap: the running step stopped, its log kept, all archived
        assert proc.returncode == 143, out
        assert files["long.log"] == "started\n"
        assert re.search(r"^== long: KILLED \(the suite got SIGTERM\)", files["suite.log"], re.M)
        assert "never" not in files["suite.log"]
        assert not live.exists()
    else:  # no trap can run: the archive of the steps before, and the running step's log as it was
        assert proc.returncode == -signal.SIGKILL
        assert "long.log" not in files and live.read_text() == "started\n"
        assert "== long (limit" in (tmp_path / "ret" / "suite.log").read_text()


def test_device_layout_makes_every_subpackage_importable_from_a_plain_tree(tmp_path):
    """bench/device_layout.py on a copy of the tree: with no install (site's .pth files, where the
    editable install lives, are not read under -S), `misotts.<sub>` resolves into the copy for
    every subpackage setup.py maps."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_layout
    finally:
        sys.path.pop(0)
    subpackages = [name.split(".")[1] for name in device_layout.package_dirs(ROOT) if name.count(".") == 1]
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for folder in ["misotts", *subpackages]:
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copy(ROOT / "bench" / "device_layout.py", tree / "bench" / "device_layout.py")
    done = subprocess.run([sys.executable, "bench/device_layout.py"], cwd=tree, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(subpackages) == sorted(set(subpackages)) and len(subpackages) >= 6
    check = ("import importlib.util, pathlib, sys\n"
             f"for sub in {subpackages!r}:\n"
             "    spec = importlib.util.find_spec('misotts.' + sub)\n"
             "    print(sub, pathlib.Path(spec.origin).resolve())\n")
    seen = subprocess.run([sys.executable, "-S", "-c", check], cwd=tree, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())})
    assert seen.returncode == 0, seen.stderr
    origins = dict(line.split(" ", 1) for line in seen.stdout.splitlines())
    assert origins == {sub: str((tree / sub / "__init__.py").resolve()) for sub in subpackages}


def test_the_suite_runs_its_steps_in_order_of_value(tmp_path):
    """bench/gpu_suite.sh itself, with no step picked: it parses, writes versions.txt with the commit,
    and lists its steps in the order the GPU-suite issue ranks them (CUDA tests, engine rows,
    kernel bench and profile, then the rest)."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", str(tmp_path / "res")],
                          env={**os.environ, "STEPS": "none", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    order = re.findall(r"^== ([a-z0-9-]+): (?:not in STEPS|not run)", done.stdout, re.M)
    assert order == ["cuda-kernels", "cuda-engine", "bench-miso-8b", "bench-csm-1b", "kernels", "profile",
                     "quant-frames", "host", "peers-csm-1b", "peers-miso-8b", "pytest-cpu"]
    versions = (tmp_path / "res" / "versions.txt").read_text()
    from misotts.bench.provenance import code_version

    assert f'"commit": "{code_version()["commit"]}"' in versions.splitlines()[0]


@pytest.mark.parametrize("script", ["gpu_suite.sh", "suite_runner.sh", "device_run.sh", "device_prepare.sh"])
def test_scripts_parse(script):
    """device_prepare.sh needs the network and device_run.sh's install branch a device: CI runs neither
    whole, so bash at least reads them all."""
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
