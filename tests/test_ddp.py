"""Stage 1 with two processes (DDP on gloo, CPU) through torchrun: it finishes and both ranks agree.

`train_stage` is the same code a single process runs; the Trainer/accelerate stack does the
process group and gradient all-reduce. Each rank writes what it ends with; the test compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tiny_models import free_port, save_tiny_llama, write_text

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from lte.training import train_stage

    root = sys.argv[1]
    rec = train_stage("1", os.path.join(root, "llama"), "causal-lm", os.path.join(root, "text.txt"),
                      os.path.join(root, "out"), max_steps=4, block_size=24, batch_size=2, lr=1e-3,
                      target_sparsity=0.5, logging_steps=1, save_steps=2, report_to="none", progress=False)
    model = rec["trainer"].model
    rank = int(os.environ["RANK"])
    result = {
        "rank": rank,
        "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "step": rec["global_step"],
        "eta": rec["eta"],
        "sparsity": rec["train_sparsity"],
        "params": float(sum(p.double().sum() for p in model.parameters())),
        "routers": [float(p.double().abs().sum()) for p in model.router_parameters()],
    }
    with open(os.path.join(root, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if torch.distributed.is_initialized():  # a clean teardown: left to interpreter exit, gloo may abort it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow  # two torchrun processes (~17 s); CI runs it (.ci/run)
def test_stage1_two_processes_agree(tmp_path):
    save_tiny_llama(tmp_path / "llama")
    write_text(tmp_path / "text.txt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == 4
    assert r0["eta"] == r1["eta"]  # the controller saw the same (all-reduced) sparsity on both ranks
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-6)
    assert r0["routers"] == pytest.approx(r1["routers"], rel=1e-6)
    # only rank 0 writes; the output is a complete, loadable stage-1 directory
    info = json.loads((tmp_path / "out" / "lte_stage.json").read_text())
    assert info["complete"] and info["stage"] == "stage1"
    import lte

    assert lte.LTEModel.from_pretrained(tmp_path / "out").stage == "stage1"
