"""Side-by-side PM benchmark: lensbench (ours_pm.py) vs the peer JaxPM 0.1.6 (peer_jaxpm.py).

Run with the PROJECT interpreter:

    .venv/bin/python experiments/benchmarks/run_pm.py                      # 32,64,128, all whats
    .venv/bin/python experiments/benchmarks/run_pm.py --sizes 32,64 --repeats 5
    .venv/bin/python experiments/benchmarks/run_pm.py --tcmalloc on        # or LENSBENCH_TCMALLOC=1
    .venv/bin/python experiments/benchmarks/run_pm.py --codes peer         # one side only

For every N and every ``what`` (forward, grad, forces, fft) it runs, one after the
other (never in parallel), ``peer_jaxpm.py`` with ``.venv-peer/bin/python`` (made by
``setup_peer.sh``) and ``ours_pm.py`` with the project venv's python, alternating
which goes first. Each is a fresh process (so peak RSS is per measurement) with a
timeout; a failure or timeout is recorded, never fatal. Both scripts share one CLI

    --n N --what {forward,grad,forces,fft} --repeats R

and print ONE JSON line on stdout:

    {"code": ..., "n": N, "what": W, "median_s": s, "all_s": [...],
     "compile_s": s, "peak_rss_mb": MB, ...}

Results go to ``experiments/benchmarks/results_pm.json`` (rewritten after every run)
and a markdown table with peer/ours ratios is printed at the end. ``--tcmalloc on``
preloads ``libtcmalloc_minimal.so.4`` (Debian ``libtcmalloc-minimal4``) into BOTH codes;
whether it was on is recorded.

The machine is shared (2 cores): every record carries ``others_cpu_cores``, the CPU that
OTHER processes used during the run (from /proc/stat minus the child's rusage); runs above
``--busy-threshold`` (0.2 cores) are retried ``--retry-busy`` times, then kept and flagged
(*) in the table. ``--wait-quiet S`` also waits up to S s for an idle machine before each run.
``--peer-args '--max-steps 10'`` benchmarks the tuned JaxPM variant (see peer_jaxpm.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WHATS = ("forward", "grad", "forces", "fft")
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def _log(msg: str) -> None:
    print(f"[run_pm] {msg}", file=sys.stderr, flush=True)


def cpu_busy_fraction(interval: float = 2.0) -> float:
    """Fraction of all CPUs busy (any process) over `interval` seconds, from /proc/stat."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (all processes) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Waits (up to max_wait s) until the machine is idle; returns the last busy fraction."""
    t0 = time.monotonic()
    busy = cpu_busy_fraction()
    while busy > threshold and time.monotonic() - t0 < max_wait:
        _log(f"machine busy ({busy:.0%} CPU), waiting ...")
        time.sleep(10)
        busy = cpu_busy_fraction()
    return busy


def find_tcmalloc() -> str | None:
    for p in TCMALLOC_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


def codes_available(wanted: list[str]) -> dict[str, list[str]]:
    """Returns {code: [python, script]} for the codes that can run."""
    out: dict[str, list[str]] = {}
    if "peer" in wanted:
        py = ROOT / ".venv-peer" / "bin" / "python"
        script = HERE / "peer_jaxpm.py"
        if py.exists():
            out["peer"] = [str(py), str(script)]
        else:
            _log(f"SKIPPING peer: {py} missing; run `bash experiments/benchmarks/setup_peer.sh`")
    if "ours" in wanted:
        py = ROOT / ".venv" / "bin" / "python"
        script = HERE / "ours_pm.py"
        if not py.exists():
            py = Path(sys.executable)
        if script.exists():
            out["ours"] = [str(py), str(script)]
        else:
            _log(f"SKIPPING ours: {script.relative_to(ROOT)} does not exist (yet)")
    return out


def _record_others(rec: dict, busy0: float, child0: float) -> None:
    """CPU used by OTHER processes while the measurement ran, in cores (0..ncpu).
    Above ~0.2 the timings were disturbed by someone else's work."""
    wall = max(rec.get("wall_s") or 0.0, 1e-3)
    others = (_busy_cpu_seconds() - busy0) - (_children_cpu_seconds() - child0)
    rec["others_cpu_cores"] = round(max(others, 0.0) / wall, 3)


def run_one(cmd_prefix: list[str], code: str, n: int, what: str, repeats: int,
            timeout: float, env: dict) -> dict:
    cmd = [*cmd_prefix, "--n", str(n), "--what", what, "--repeats", str(repeats)]
    rec: dict = {"code_key": code, "n": n, "what": what, "repeats": repeats, "cmd": " ".join(cmd),
                 # 1-min load average before the run: >~0.5 on this 2-core box means someone
                 # else was using the CPU and the timings are suspect
                 "loadavg_before": round(os.getloadavg()[0], 2)}
    busy0, child0 = _busy_cpu_seconds(), _children_cpu_seconds()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        rec.update(ok=False, error=f"timeout after {timeout:.0f} s",
                   stderr_tail=(e.stderr or b"")[-2000:].decode("utf-8", "replace")
                   if isinstance(e.stderr, bytes) else (e.stderr or "")[-2000:])
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        return rec
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    rec["loadavg_after"] = round(os.getloadavg()[0], 2)
    _record_others(rec, busy0, child0)
    rec["rc"] = p.returncode
    parsed = None
    for line in reversed(p.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if p.returncode == 0 and parsed is not None:
        rec.update(ok=True, **{k: v for k, v in parsed.items() if k not in ("n", "what")})
    else:
        rec.update(ok=False,
                   error=f"exit code {p.returncode}" + ("" if parsed else ", no JSON line"),
                   stderr_tail=p.stderr[-2000:])
        if parsed:
            rec["partial"] = parsed
    return rec


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

def _get(records, code, n, what, key="median_s"):
    for r in reversed(records):
        if r["code_key"] == code and r["n"] == n and r["what"] == what and r.get("ok"):
            return r.get(key)
    return None


def _disturbed(records, n, what):
    return any(r.get("disturbed") for r in records if r["n"] == n and r["what"] == what)


def _fmt(v, scale=1.0, digits=3):
    if v is None:
        return "—"
    v = v * scale
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}g}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def markdown(records, sizes) -> str:
    rows = []
    for n in sizes:
        items = [
            ("forward [s]", "forward", "median_s", 1.0),
            ("gradient [s]", "grad", "median_s", 1.0),
            ("peak RSS forward [MB]", "forward", "peak_rss_mb", 1.0),
            ("peak RSS gradient [MB]", "grad", "peak_rss_mb", 1.0),
            ("pm_forces [ms]", "forces", "median_s", 1e3),
            ("FFT floor 1 rfftn + 3 irfftn [ms]", "fft", "median_s", 1e3),
        ]
        for label, what, key, scale in items:
            p = _get(records, "peer", n, what, key)
            o = _get(records, "ours", n, what, key)
            if p is None and o is None and not any(
                    r["n"] == n and r["what"] == what for r in records):
                continue
            mark = " (*)" if key == "median_s" and _disturbed(records, n, what) else ""
            rows.append((n, label + mark, _fmt(p, scale), _fmt(o, scale), _ratio(p, o)))
        pf, pfft = _get(records, "peer", n, "forces"), _get(records, "peer", n, "fft")
        of, offt = _get(records, "ours", n, "forces"), _get(records, "ours", n, "fft")
        pm = pf / pfft if pf and pfft else None
        om = of / offt if of and offt else None
        if pm is not None or om is not None:
            rows.append((n, "forces / own FFT floor", _fmt(pm), _fmt(om), _ratio(pm, om)))
        for r in records:
            if r["n"] == n and not r.get("ok"):
                rows.append((n, f"FAILED {r['code_key']} {r['what']}", r.get("error", "?"), "", ""))
    head = "| N | metric | JaxPM 0.1.6 | lensbench | JaxPM / lensbench |\n|---|---|---|---|---|\n"
    foot = ("\n\n(*) other processes used the CPUs during that measurement "
            "(others_cpu_cores in the JSON): its time is not reliable."
            if any(r.get("disturbed") for r in records) else "")
    return (head + "\n".join(f"| {n}³ | {m} | {a} | {b} | {c} |" for n, m, a, b, c in rows)
            + foot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--whats", default=",".join(WHATS))
    ap.add_argument("--codes", default="peer,ours", help="subset of peer,ours")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large-n", type=int, default=128,
                    help="from this N on, 'grad' uses --large-grad-repeats")
    ap.add_argument("--large-grad-repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--tcmalloc", choices=["on", "off"],
                    default="on" if os.environ.get("LENSBENCH_TCMALLOC", "") not in ("", "0")
                    else "off",
                    help="LD_PRELOAD libtcmalloc_minimal.so.4 into both codes "
                         "(default from env LENSBENCH_TCMALLOC)")
    ap.add_argument("--peer-args", default="",
                    help="extra CLI for peer_jaxpm.py, e.g. '--max-steps 10'")
    ap.add_argument("--ours-args", default="", help="extra CLI for ours_pm.py")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each run wait up to SECONDS for the CPUs to be idle "
                         "(<15%% busy), so other jobs do not skew the timings")
    ap.add_argument("--retry-busy", type=int, default=1,
                    help="re-run a measurement up to this many times when other processes "
                         "used more than --busy-threshold cores during it")
    ap.add_argument("--busy-threshold", type=float, default=0.2)
    ap.add_argument("--out", default=str(HERE / "results_pm.json"))
    a = ap.parse_args(argv)

    sizes = [int(s) for s in a.sizes.split(",") if s]
    whats = [w for w in a.whats.split(",") if w]
    for w in whats:
        if w not in WHATS:
            ap.error(f"unknown what {w!r}")
    codes = codes_available([c for c in a.codes.split(",") if c])
    extra = {"peer": shlex.split(a.peer_args), "ours": shlex.split(a.ours_args)}
    for c in codes:
        codes[c] = codes[c] + extra[c]
    if not codes:
        _log("nothing to run")
        return 1

    env = dict(os.environ)
    tcm = None
    if a.tcmalloc == "on":
        tcm = find_tcmalloc()
        if tcm is None:
            _log("tcmalloc requested but libtcmalloc_minimal.so.4 not found "
                 "(apt-get install -y libtcmalloc-minimal4); running WITHOUT it")
        else:
            env["LD_PRELOAD"] = (tcm + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("PYTHONUNBUFFERED", "1")

    meta = {
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tcmalloc": tcm is not None,
        "ld_preload": env.get("LD_PRELOAD"),
        "xla_flags": env.get("XLA_FLAGS"),
        "sizes": sizes, "whats": whats, "codes": sorted(codes),
        "repeats": a.repeats, "large_n": a.large_n, "large_grad_repeats": a.large_grad_repeats,
        "timeout_s": a.timeout, "busy_threshold": a.busy_threshold,
        "peer_args": a.peer_args, "ours_args": a.ours_args,
        "setting": "box 256 Mpc/h, N^3 particles = mesh, 2LPT at a=0.1, 10 steps to a=1, "
                   "float32; grad = d sum(rho^2) / d(Omega_c, white-noise ICs)",
    }
    try:
        meta["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                         capture_output=True, text=True).stdout.strip()
    except OSError:
        pass

    records: list[dict] = []
    out_path = Path(a.out)

    def save():
        out_path.write_text(json.dumps({"meta": meta, "results": records}, indent=1) + "\n")

    k = 0
    for n in sizes:
        for what in whats:
            reps = a.large_grad_repeats if (what == "grad" and n >= a.large_n) else a.repeats
            order = sorted(codes) if k % 2 == 0 else sorted(codes, reverse=True)
            k += 1
            for code in order:
                _log(f"{code:4s} n={n:<4d} {what:8s} repeats={reps} ...")
                discarded = []
                for attempt in range(1 + a.retry_busy):
                    busy = (wait_quiet(a.wait_quiet) if a.wait_quiet > 0
                            else cpu_busy_fraction(1.0))
                    rec = run_one(codes[code], code, n, what, reps, a.timeout, env)
                    rec["cpu_busy_before"] = round(busy, 3)
                    rec["attempt"] = attempt
                    if not rec.get("ok") or rec.get("others_cpu_cores", 0) <= a.busy_threshold:
                        break
                    discarded.append({"median_s": rec.get("median_s"),
                                      "others_cpu_cores": rec["others_cpu_cores"]})
                    _log(f"     disturbed: other processes used {rec['others_cpu_cores']} cores "
                         f"during the run (median {rec.get('median_s')}); "
                         + ("retrying" if attempt < a.retry_busy else "keeping it, flagged"))
                rec["tcmalloc"] = tcm is not None
                rec["disturbed"] = rec.get("others_cpu_cores", 0) > a.busy_threshold
                if discarded:
                    rec["discarded_attempts"] = discarded
                records.append(rec)
                save()
                if rec.get("ok"):
                    _log(f"     median {rec['median_s']:.4g} s, compile {rec.get('compile_s')} s, "
                         f"peak RSS {rec.get('peak_rss_mb')} MB (wall {rec['wall_s']} s)")
                else:
                    _log(f"     FAILED: {rec.get('error')}\n{rec.get('stderr_tail', '')[-800:]}")
    meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    save()
    table = markdown(records, sizes)
    print(f"\ntcmalloc: {'on (' + tcm + ')' if tcm else 'off'}; results: {out_path}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
