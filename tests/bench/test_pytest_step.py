"""The GPU suite's pytest step: CPU tests interpreted with CUDA hidden, CUDA tests compiled, each in
its own process -- checked here with CUDA faked present and absent on a throwaway test folder."""
import json

from misotts.bench.pytest_step import main

TESTS = '''
import json, os, pytest

def record(kind):
    with open(os.path.join(os.path.dirname(__file__), kind + ".json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}, f)

def test_cpu():
    record("cpu")

@pytest.mark.cuda
def test_cuda():
    record("cuda")
    assert not os.environ.get("FAIL_CUDA")
'''


def suite(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")
    (tmp_path / "test_env.py").write_text(TESTS)
    return tmp_path


def seen(folder, kind):
    path = folder / f"{kind}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_with_cuda_cpu_tests_are_interpreted_with_cuda_hidden_and_cuda_tests_native(tmp_path, monkeypatch):
    folder = suite(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU machine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main(["-q", "-p", "no:cacheprovider"], cuda=True, cwd=folder) == 0
    assert seen(folder, "cpu") == {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    assert seen(folder, "cuda") == {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": "0"}
    (folder / "cuda.json").unlink()
    assert main(["--run", "cpu", "-q", "-p", "no:cacheprovider"], cuda=True, cwd=folder) == 0  # one run only
    assert seen(folder, "cuda") is None
    monkeypatch.setenv("FAIL_CUDA", "1")  # a failing run fails the step
    assert main(["-q", "-p", "no:cacheprovider"], cuda=True, cwd=folder) == 1


def test_without_cuda_one_interpreted_run_as_ci(tmp_path, monkeypatch):
    folder = suite(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["-q", "-p", "no:cacheprovider"], cuda=False, cwd=folder) == 0
    assert seen(folder, "cpu") == seen(folder, "cuda") == {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": None}


def test_without_cuda_the_cuda_selection_still_collects(tmp_path, monkeypatch):
    """The GPU suite's CPU rehearsal: `--run cuda` on a machine without CUDA runs the CUDA selection
    (interpreted), not nothing -- so a CUDA test module that fails to import is found on the CPU."""
    folder = suite(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["--run", "cuda", "-q", "-p", "no:cacheprovider"], cuda=False, cwd=folder) == 0
    assert seen(folder, "cpu") is None  # -m cuda: the CPU test was not selected
    assert seen(folder, "cuda") == {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": None}
    (folder / "test_broken.py").write_text("import a_module_this_machine_lacks\n")
    assert main(["--run", "cuda", "-q", "-p", "no:cacheprovider"], cuda=False, cwd=folder) == 1
