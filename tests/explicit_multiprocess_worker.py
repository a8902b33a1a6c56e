"""One of two processes of a jax.distributed run on localhost (1 CPU device each, a 2x1 grid): the
short NUTS run of explicit_sharded_worker's tiny PM model with the field split over the two
processes, once uninterrupted and once killed after its second commit and resumed; process 0
writes both runs' θ records and kept fields to OUT.npz (see test_explicit.py).

usage: python explicit_multiprocess_worker.py PROCESS_ID PORT WORK_DIR OUT.npz
"""

import sys
from pathlib import Path

from procs import set_xla_flags  # noqa: E402

set_xla_flags(1)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]))

import numpy as np  # noqa: E402

from explicit import checkpoint as ckpt  # noqa: E402
from simulators import DeviceGrid  # noqa: E402
import explicit_sharded_worker as esw  # noqa: E402


class Killed(Exception):
    pass


def main():
    import simulators
    simulators.enable_x64()
    assert jax.process_count() == 2 and jax.device_count() == 2
    work = Path(sys.argv[3])
    model = esw.nuts_model(DeviceGrid((2, 1), halo=4))  # one model: one compilation for 3 runs
    ref = esw.run_nuts(model, work / "uninterrupted")
    real, calls = ckpt.save_chain, {"n": 0}

    def save(*args, **kw):  # the second commit (rows 0-4) is written, then the run dies
        real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    ckpt.save_chain = save
    try:
        esw.run_nuts(model, work / "resumed")
        raise AssertionError("the run was not interrupted")
    except Killed:
        pass
    ckpt.save_chain = real
    ckpt.barrier("killed")  # each process deletes its own stale piece after the commit
    split = sorted(p.name for p in (work / "resumed" / "state").glob("*.h5"))
    assert split == ["c0_4.p0.h5", "c0_4.p1.h5"], split  # each process its own piece, no stale one
    res = esw.run_nuts(model, work / "resumed")
    if jax.process_index() == 0:
        out = {"theta": ref.theta, "theta_resumed": res.theta,
               "fields": ref.fields(0), "fields_resumed": res.fields(0),
               "field_files": np.array(sorted(p.name for p in (work / "resumed" / "fields").iterdir()))}
        for name in ckpt.RECORDS:
            out[f"rec_{name}"] = ckpt.load_chain(work / "uninterrupted", 0).records[name]
            out[f"rec_resumed_{name}"] = ckpt.load_chain(work / "resumed", 0).records[name]
        np.savez(sys.argv[4], **out)


if __name__ == "__main__":
    main()
