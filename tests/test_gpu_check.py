"""experiments/benchmarks/gpu_check: the one-line refusal without a GPU, the orchestration (JSON
rewritten after every item, timeouts keep partial results, every key present), the trace parser
on a real CPU trace, and one real smoke item end to end. The full ``--cpu-smoke`` run (ten items,
minutes of CPU compiles) is too slow for the suite; these cover its parts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "gpu_check.sh"


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


@pytest.mark.skipif(not _on_cpu(), reason="the refusal needs a machine without a GPU")
def test_refuses_without_gpu_in_one_line(tmp_path):
    out = tmp_path / "g.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == ["gpu_check: no GPU found (jax backend 'cpu'); use --cpu-smoke to test the "
                     "script on CPU"]
    assert not out.exists()


def _fake_result(item: gc.Item) -> dict:
    """A result of the kind's shape (numbers where the table formats numbers)."""
    r = {k: 1.0 for k in gc.KEYS[item.kind]}
    if item.kind == "env":
        r.update(backend="gpu", devices=["cuda:0"], nvidia_smi="name, memory.total\nH200, 143 GiB")
    if item.kind == "grads":
        r.update(mesh_shape=[8, 8, 16], device_peak_bytes=2**20)
    if item.kind == "vmap":
        r["batches"] = [{k: 1.0 for k in gc.BATCH_KEYS} | {"K": k, "speedup_over_K1": None if k == 1 else 2.0}
                        for k in (1, 4)]
    if item.kind == "profile":
        r.update(cost={"flops": 1e9}, trace={"file": "x.xplane.pb"},
                 top_ops=[{"op": "fusion.1", "ms_per_call": 2.0, "fraction": 0.5, "category": None}])
    if item.kind == "parts":
        r["parts"] = {"paint": {"forward_s": 1e-3, "gradient_s": 2e-3}}
    return r


def test_orchestration_writes_after_each_item_and_keeps_partial_results(tmp_path):
    out = tmp_path / "g.json"
    items = gc.plan(smoke=True)
    seen = []

    def runner(item, timeout_s, env):
        if seen:  # the previous item is on disk before the next starts
            doc = json.loads(out.read_text())
            assert doc["items"][seen[-1]]["status"] in ("ok", "timeout", "error")
            assert doc["items"][item.name]["status"] == "pending"
        seen.append(item.name)
        assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] and env["JAX_PLATFORMS"] == "cpu"
        if item.kind == "profile":  # killed after its first stage: that stage is kept
            return "timeout", {"compile_s": 3.0}, f"timed out after {timeout_s:.0f} s"
        if item.kind == "parts":
            return "error", None, "RuntimeError: boom"
        if item.name == "grads/quick/checkpoint":  # a result missing keys is an error
            return "ok", {"config": "quick"}, None
        return "ok", _fake_result(item), None

    lines = []
    doc = gc.run_plan(items, out, smoke=True, budget_s=1e4, runner=runner, echo=lines.append)
    assert seen == [it.name for it in items]
    on_disk = json.loads(out.read_text())
    assert on_disk["finished"] and on_disk == json.loads(json.dumps(doc))
    rows = on_disk["items"]
    assert list(rows) == [it.name for it in items]
    # every section of the brief is planned: env, both configs x both modes x both lsst meshes,
    # vmap over K, the profile and the sub-programs
    names = set(rows)
    for cfg in ("quick", "lsst_y10_16x16x64", "lsst_y10_16x16x128"):
        for mode in ("adjoint", "checkpoint"):
            assert f"grads/{cfg}/{mode}" in names
    assert {"env", "vmap/quick", "profile/lsst_y10_16x16x128", "parts/lsst_y10_16x16x128"} <= names
    assert rows["profile/lsst_y10_16x16x128"]["status"] == "timeout"
    assert rows["profile/lsst_y10_16x16x128"]["result"] == {"compile_s": 3.0}
    assert rows["parts/lsst_y10_16x16x128"]["error"] == "RuntimeError: boom"
    assert rows["grads/quick/checkpoint"]["status"] == "error"
    assert "median_seconds_per_gradient" in rows["grads/quick/checkpoint"]["error"]
    assert rows["grads/quick/adjoint"]["status"] == "ok"
    assert len(lines) == len(items) and all(isinstance(s, str) for s in lines)


def test_budget_skips_the_last_items_and_no_gpu_refuses(tmp_path):
    items = gc.plan(smoke=False)
    names = [it.name for it in items]
    assert names[-1].startswith("hires/") and names[-2].startswith("parts/")  # largest last
    # each item takes 60 s of a fake clock: with 150 s, env and one item run, the third gets
    # the 30 s left as its timeout, and the rest (under MIN_ITEM_S left) are skipped
    now = {"t": 0.0}
    timeouts = []

    def runner(item, timeout_s, env):
        timeouts.append(timeout_s)
        now["t"] += 60.0
        return "ok", _fake_result(item), None

    doc = gc.run_plan(items, tmp_path / "a.json", smoke=False, budget_s=150.0, runner=runner,
                      echo=lambda s: None, clock=lambda: now["t"])
    statuses = [r["status"] for r in doc["items"].values()]
    assert statuses == ["ok"] * 3 + ["skipped"] * (len(items) - 3)
    assert timeouts == [items[0].timeout_s, items[1].timeout_s, 30.0]
    assert json.loads((tmp_path / "a.json").read_text())["finished"]
    # no GPU: the env item's backend decides, and nothing is written
    doc = gc.run_plan(items, tmp_path / "b.json", smoke=False, budget_s=100.0,
                      runner=lambda it, t, e: ("ok", dict(_fake_result(it), backend="cpu"), None),
                      echo=lambda s: None)
    assert doc["refused"] == gc.NO_GPU.format(backend="cpu")
    assert not (tmp_path / "b.json").exists()


def test_trace_summary_on_a_cpu_trace(tmp_path):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.fft.irfftn(jnp.fft.rfftn(x) * 2.0, s=x.shape).sum() + jnp.sin(x).sum())
    x = jnp.ones((16, 16, 16))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            f(x).block_until_ready()
    (pb,) = tmp_path.rglob("*.xplane.pb")
    s = gc.summarize_trace(pb, calls=2)
    assert s["source"] == "host thunks by hlo_op" and s["op_ms_per_call"] > 0
    assert 0 < len(s["top_ops"]) <= gc.TOP_OPS
    assert any(o["op"].startswith("fft") for o in s["top_ops"])
    assert abs(sum(o["fraction"] for o in s["top_ops"]) - 1.0) < 1e-6 or len(s["top_ops"]) == gc.TOP_OPS


def test_cpu_smoke_one_real_item(tmp_path):
    """env and the quick adjoint gradient at 8x8x16, for real, through the CLI."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.gpu_check", "--cpu-smoke",
                           "--only", "grads/quick/adjoint", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["finished"] and doc["mode"] == "cpu-smoke"
    assert list(doc["items"]) == ["env", "grads/quick/adjoint"]
    for name, row in doc["items"].items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert not gc.missing_keys(row["kind"], row["result"])
    g = doc["items"]["grads/quick/adjoint"]["result"]
    assert g["mesh_shape"] == [8, 8, 16] and g["backend"] == "cpu"
    assert g["device_peak_bytes"] is None and g["median_seconds_per_gradient"] > 0
    assert "grads/quick/adjoint" in proc.stdout and "2/2 items ok" in proc.stdout


def test_nested_spans_count_once():
    """A CPU while thunk spans its body's thunks: it keeps only its own time."""
    ev = gc._exclusive([("while", 0, 100, {}), ("a", 10, 30, {}), ("b", 50, 20, {}),
                        ("c", 200, 5, {})])
    assert [(n, t) for n, t, _ in ev] == [("while", 50), ("a", 30), ("b", 20), ("c", 5)]


def test_hires_item_is_planned_with_a_loadable_smoke_configuration():
    """The resolved-lightcone item comes last; its CPU-smoke changes make a valid (tiny) shells
    configuration, and its table line reads a result with the item's keys. (A smoke run of it
    takes ~90 s of CPU compiles: ``gpu_check --cpu-smoke --only hires``, NOTEBOOK 13.)"""
    import numpy as np

    from experiments.config import load_config

    items = gc.plan(smoke=True)
    assert items[-1].name == "hires/lsst_y10_hires" and items[-1].kind == "hires"
    spec = items[-1].spec
    cfg = load_config(spec["config"]).with_(**spec["changes"])
    cells = sum(int(np.prod(c.mesh_shape)) for c, _ in cfg.shell_configs())
    assert cells < 200_000
    full = gc.plan(smoke=False)[-1].spec
    assert full["config"] == "lsst_y10_hires" and not full["changes"]
    result = {k: 1.0 for k in gc.KEYS["hires"]}
    result.update(mesh_cells=1.2e8, device_peak_bytes=None, device_bytes_per_cell=None)
    assert not gc.missing_keys("hires", result)
    line = gc.describe("hires/lsst_y10_hires", {"status": "ok", "kind": "hires",
                                                        "wall_s": 3.0, "result": result})
    assert "120.0M cells" in line and "gradient 1.0 s" in line
