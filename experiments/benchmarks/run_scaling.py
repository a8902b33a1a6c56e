"""Memory against the number of steps (reverse adjoint vs autodiff with checkpointing) and weak
scaling over fake CPU devices, each measurement in its own process via ``ours_pm.py``.

    .venv/bin/python experiments/benchmarks/run_scaling.py [--n 64] [--steps 5,10,20,40]
        [--devices 1,2,4,8] [--out experiments/benchmarks/results_scaling.json]

Prints two markdown tables. Memory is reported two ways: XLA's temporary buffer size for the
compiled computation (the working set of the run itself) and the process's peak RSS (which also
holds the JAX runtime and compilation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
OURS = HERE / "ours_pm.py"
# weak scaling: 64³ cells per device; device grid and global mesh for each device count
LAYOUTS = {1: ("1x1", "64x64x64"), 2: ("2x1", "128x64x64"), 4: ("2x2", "128x128x64"),
           8: ("4x2", "256x128x64")}


def measure(*args, timeout=1800):
    cmd = [sys.executable, str(OURS), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                "args": list(map(str, args))}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", default="5,10,20,40")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results_scaling.json"))
    args = p.parse_args()

    memory = []
    for steps in map(int, args.steps.split(",")):
        row = {"steps": steps}
        row["forward"] = measure("--n", args.n, "--what", "forward", "--steps", steps,
                                 "--repeats", args.repeats)
        for mode in ("adjoint", "checkpoint"):
            row[mode] = measure("--n", args.n, "--what", "grad", "--gradient", mode,
                                "--steps", steps, "--repeats", args.repeats)
        memory.append(row)
        print(json.dumps(row), file=sys.stderr)

    scaling = []
    for d in map(int, args.devices.split(",")):
        pdims, mesh = LAYOUTS[d]
        row = {"devices": d, "pdims": pdims, "mesh": mesh}
        for what in ("forward", "grad"):
            row[what] = measure("--n", 64, "--mesh", mesh, "--devices", d, "--pdims", pdims,
                                "--what", what, "--repeats", args.repeats)
        scaling.append(row)
        print(json.dumps(row), file=sys.stderr)

    Path(args.out).write_text(json.dumps({"memory": memory, "scaling": scaling}, indent=1))
    print(table(memory, scaling, args.n))


def _fmt(r, key, scale=1.0, fmt="{:.2f}"):
    return fmt.format(r[key] * scale) if "error" not in r and r.get(key) is not None else "err"


def table(memory, scaling, n):
    lines = [f"Memory vs steps, {n}³, float32 (XLA temp MB / process peak RSS MB; time s)", "",
             "| steps | forward | grad adjoint | grad checkpoint | adjoint/forward (temp) |",
             "|---|---|---|---|---|"]
    for row in memory:
        cells = []
        for key in ("forward", "adjoint", "checkpoint"):
            r = row[key]
            cells.append(f"{_fmt(r, 'xla_temp_mb', fmt='{:.0f}')} / {_fmt(r, 'peak_rss_mb', fmt='{:.0f}')}"
                         f" ; {_fmt(r, 'median_s')} s")
        f, a = row["forward"], row["adjoint"]
        ratio = (f"{a['xla_temp_mb'] / f['xla_temp_mb']:.2f}"
                 if "error" not in f and "error" not in a else "err")
        lines.append(f"| {row['steps']} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Weak scaling, 64³ cells per fake CPU device (all devices share this machine's cores)",
              "", "| devices | grid | mesh | forward s | grad s | forward efficiency |", "|---|---|---|---|---|---|"]
    base = scaling[0]["forward"].get("median_s") if scaling else None
    for row in scaling:
        f, g = row["forward"], row["grad"]
        eff = f"{base / f['median_s']:.2f}" if base and "error" not in f else "err"
        lines.append(f"| {row['devices']} | {row['pdims']} | {row['mesh']} | {_fmt(f, 'median_s')} | "
                     f"{_fmt(g, 'median_s')} | {eff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
