"""The Ray executor on a real local Ray cluster (tests/ray_cluster.py): same results as the local
executor bit for bit, dependencies built once with the right resources, custom models on the
workers, a killed worker retried, a killed driver resumed; the cluster checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medxfer.executors.ray import ClusterError, check_resources
from medxfer.results import read_result
from medxfer.testing import write_stripes_blobs
from runs import REPO, built_counts, comparable, env, first_difference, medxfer, tiny_checkpoint

pytestmark = pytest.mark.ray
PROTOCOLS = "fewshot,linear,finetune,transferability"
N_CELLS = 8  # 2 models x 4 protocols


def grid_args(data: Path, ckpts: tuple[Path, Path], out: Path, cache: Path, finetune_steps: int = 12) -> list[str]:
    """Two custom models (the user's own checkpoints: they must reach the workers) x 4 protocols."""
    return ["run", "--quiet", "--models", f"mine=tinycnn:{ckpts[0]},other=tinycnn:{ckpts[1]}",
            "--dataset", f"toy=folder:{data}", "--image-size", "32", "--protocols", PROTOCOLS,
            "--set", "fewshot.n_shot=4", "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=30",
            "--set", f"finetune.max_steps={finetune_steps}", "--set", "finetune.val_every=3",
            "--set", "finetune.batch_size=4", "--set", "finetune.train_size=40", "--set", "finetune.bootstrap=50",
            "--out", str(out), "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The data, the custom checkpoint and the local executor's reference run of the grid
    (one thread, as each one-CPU Ray task: the linear solver's float reductions depend on the
    thread count)."""
    base = tmp_path_factory.mktemp("raygrid")
    data = write_stripes_blobs(base / "data", n_per_class=24, size=32)
    ckpt = (tiny_checkpoint(base / "mine.pth", seed=3), tiny_checkpoint(base / "other.pth", seed=4))
    ref = base / "local"
    t0 = time.monotonic()
    proc = medxfer(*grid_args(data, ckpt, ref, base / "cache-local"), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    print(f"local reference run: {time.monotonic() - t0:.1f}s")
    return {"base": base, "data": data, "ckpt": ckpt, "ref": ref}


def _assert_same_results(run: Path, ref: Path) -> None:
    a, b = comparable(run), comparable(ref)
    assert sorted(a) == sorted(b) and len(a) == N_CELLS
    for name in a:
        assert first_difference(a[name], b[name]) is None, (name, first_difference(a[name], b[name]))


def test_ray_run_equals_local_run_bit_for_bit(ray_cluster, grid):
    out = grid["base"] / "ray"
    t0 = time.monotonic()
    proc = medxfer(*grid_args(grid["data"], grid["ckpt"], out, grid["base"] / "cache-ray"),
                   "--executor", "ray", "--address", ray_cluster)
    assert proc.returncode == 0, proc.stderr
    print(f"ray run: {time.monotonic() - t0:.1f}s")
    _assert_same_results(out, grid["ref"])
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["spec"]["executor"] == "ray"
    assert [d["name"] for d in record["spec"]["custom_models"]] == ["mine", "other"]  # the workers registered them
    steps = {s["step"]: s for s in record["ray"]["steps"]}
    # each (dataset, transform) prepared once, each (model, dataset, layer) extracted once
    assert sorted(steps) == ["extract mine on toy (pooled, aspect)", "extract other on toy (pooled, aspect)",
                             "prepare toy (32px, aspect)", "prepare toy (40px, keep)"]
    assert all(s["built"] and "error" not in s for s in steps.values())
    for name, s in steps.items():  # extraction asked for (and got) the GPU, preparation a CPU
        assert s["ran_on"]["resources"].get("GPU", 0) == (1.0 if name.startswith("extract") else 0), name
    for c in record["cells"]:
        gpu = c["ran_on"]["resources"].get("GPU", 0)
        assert gpu == (1.0 if "__finetune__" in c["cell"] else 0), c
    assert all(n == 1 for n in built_counts([out]).values())  # every build credited to exactly one cell
    assert len(built_counts([out])) == 4


def _ray_processes(fragment: str) -> list[int]:
    """Pids of this user's Ray worker processes whose title contains ``fragment``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith("ray::") and fragment in text:
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_worker_killed_mid_task_is_retried_and_the_grid_completes(ray_cluster, grid):
    out = grid["base"] / "ray-worker-killed"
    proc = subprocess.Popen([sys.executable, "-m", "medxfer", *grid_args(grid["data"], grid["ckpt"], out,
                                                                         grid["base"] / "cache-wk"),
                             "--executor", "ray", "--address", ray_cluster],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        found = _ray_processes("medxfer cell mine__toy__finetune")
        if found:
            time.sleep(0.3)  # let it get into the task
            os.kill(found[0], signal.SIGKILL)  # a worker of the test's own cluster
            killed = found[0]
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "the finetune task was never seen running"
    assert proc.returncode == 0, err
    _assert_same_results(out, grid["ref"])
    record = json.loads((out / "run.json").read_text())
    (ft,) = [c for c in record["cells"] if c["cell"].startswith("mine__toy__finetune")]
    assert ft["status"] == "computed" and ft["ran_on"]["pid"] != killed  # re-run in another worker


def test_a_driver_killed_mid_grid_leaves_nothing_half_written_and_resume_finishes_it(ray_cluster, grid):
    out = grid["base"] / "ray-driver-killed"
    proc = subprocess.Popen([sys.executable, "-m", "medxfer", *grid_args(grid["data"], grid["ckpt"], out,
                                                                         grid["base"] / "cache-dk"),
                             "--executor", "ray", "--address", ray_cluster],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    seen = 0
    while proc.poll() is None and time.monotonic() < deadline:
        seen = len(list((out / "results").glob("*.json"))) if (out / "results").is_dir() else 0
        if seen >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    done = sorted((out / "results").glob("*.json"))
    assert 2 <= len(done) < N_CELLS
    for f in done:  # every result there is whole; nothing else but hidden temporary names
        assert read_result(f) is not None, f
    assert all(p.name.startswith(".") or p.suffix == ".json" for p in (out / "results").iterdir())
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running"
    time.sleep(1)  # the cluster cancels the dead driver's tasks
    resumed = medxfer("run", "--quiet", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "reused" in resumed.stderr
    _assert_same_results(out, grid["ref"])
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_ray_run_without_a_gpu_for_a_gpu_task_is_a_clear_error(ray_cluster, grid, tmp_path):
    """--device cpu runs every task on CPUs; the check itself is exercised with the cluster's
    real node list and with a GPU-less one."""
    import ray

    ray.init(address=ray_cluster, logging_level="WARNING")
    try:
        nodes = ray.nodes()
    finally:
        ray.shutdown()
    check_resources(nodes, [("finetune", {"num_cpus": 1, "num_gpus": 1})], "here")  # the fake GPU suffices
    without = [dict(n, Resources={k: v for k, v in n["Resources"].items() if k != "GPU"}) for n in nodes]
    with pytest.raises(ClusterError, match=r"no node for 1 task\(s\) ask for a GPU \(finetune\).*--device cpu"):
        check_resources(without, [("finetune", {"num_cpus": 1, "num_gpus": 1}), ("fewshot", {"num_cpus": 1})],
                        "at HEAD")
    with pytest.raises(ClusterError, match=r"ask for 3 CPU"):
        check_resources(without, [("linear", {"num_cpus": 3})], "at HEAD")
    proc = medxfer("run", "--quiet", "--executor", "ray", "--address", ray_cluster, "--models", "test-tiny",
                   "--weights", "random", "--dataset", f"toy=folder:{grid['data']}", "--image-size", "32",
                   "--protocols", "fewshot", "--set", "fewshot.n_shot=4", "--set", "fewshot.episodes=10",
                   "--cpus-per-task", "4", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "ask for 4 CPU(s)" in err[0] and "2 CPU / 1 GPU" in err[0], err
    assert not (tmp_path / "o").exists()  # checked before anything was written


def test_ray_missing_is_a_clear_error(tmp_path):
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def no_ray(name, *a, **k):\n    if name == 'ray' or name.startswith('ray.'): raise ImportError(name)\n"
            "    return real(name, *a, **k)\nbuiltins.__import__ = no_ray\n"
            "from medxfer.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    data = write_stripes_blobs(tmp_path / "data", n_per_class=12, size=32)
    proc = subprocess.run([sys.executable, "-c", code, "run", "--executor", "ray", "--models", "test-tiny",
                           "--weights", "random", "--dataset", f"toy=folder:{data}", "--image-size", "32",
                           "--set", "fewshot.n_shot=4", "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=10",
                           "--out", str(tmp_path / "o")],
                          env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and 'pip install "medxfer[ray]"' in proc.stderr, proc.stderr
