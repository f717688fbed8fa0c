"""Several processes, one training: two gloo ranks on the CPU end with identical weights, equal
to one process on the same global batch; gradient accumulation changes nothing but memory; a
real stage runs unchanged under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_blob_folder
from safetensors.torch import load_file

#: Trains a small conv net on fixed data with a deterministic loss; each rank saves its weights.
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from diffex.train.distributed import rank
    from diffex.train.loop import EpochSampler, LoopConfig, run_loop

    torch.set_num_threads(1)
    out, accumulate = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 8, 8, generator=g)
    y = x.mean(dim=(1, 2, 3)) * 3 + 1
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 1),
    )
    batches = ((x[i], y[i]) for i in iter(EpochSampler(32, 8, seed=0)))

    def loss_fn(m, batch, step):
        xb, yb = batch
        return {"loss": ((m(xb).squeeze(1) - yb) ** 2).mean()}

    cfg = LoopConfig(steps=6, lr=0.05, ema_decay=0.9, accumulate=accumulate)
    result = run_loop(net, loss_fn, batches, cfg, torch.device("cpu"), desc="toy")
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, f"{out}/rank{rank()}.safetensors")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_two_gloo_ranks_end_identical_and_equal_one_process(tmp_path: Path) -> None:
    script = tmp_path / "toy.py"
    script.write_text(SCRIPT)
    two, one, acc = tmp_path / "two", tmp_path / "one", tmp_path / "acc"
    for d in (two, one, acc):
        d.mkdir()
    proc = _torchrun([str(script), str(two), "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for out, accumulate in ((one, "1"), (acc, "4")):  # one process, whole or micro-batches
        solo = subprocess.run(
            [sys.executable, str(script), str(out), accumulate],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert solo.returncode == 0, solo.stderr[-2000:]
    r0, r1 = _weights(two / "rank0.safetensors"), _weights(two / "rank1.safetensors")
    single = _weights(one / "rank0.safetensors")
    micro = _weights(acc / "rank0.safetensors")
    torch.manual_seed(0)
    init = torch.nn.Conv2d(2, 4, 3, padding=1).weight
    assert not torch.allclose(single["0.weight"], init, atol=1e-3)  # it trained
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # both ranks hold the same weights
        assert torch.allclose(r0[key], single[key], atol=1e-5), key  # = one process
        assert torch.allclose(micro[key], single[key], atol=1e-5), key  # = no accumulation
    assert proc.stderr.count("toy: step 1/6") <= 1  # only rank 0 speaks


@pytest.mark.slow
def test_a_stage_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "blobs", n_per_class=24)
    run = tmp_path / "run"
    args = [
        "-m",
        "diffex",
        "--",  # torchrun's parser would read --run as an abbreviation of its --run-path
        "--device",
        "cpu",
        "train-classifier",
        "--data",
        str(data),
        "--run",
        str(run),
        "--image-size",
        "32",
        "--preset",
        "tiny",
        "--epochs",
        "2",
        "--min-steps",
        "1",
    ]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (run / "classifier" / "model.safetensors").is_file()
    # both ranks end with the same model (weights and BatchNorm statistics): same scores
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("test: accuracy")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stdout


@pytest.mark.parametrize(("local", "policy"), [("2", "PASSIVE"), ("1", None), ("", None)])
def test_openmp_threads_sleep_only_in_multi_process_launches(
    local: str, policy: str | None
) -> None:
    """Several processes on one machine: importing diffex makes idle OpenMP threads sleep. One
    process keeps OpenMP's default policy (PASSIVE slowed its training steps 1.3 times)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    if local:
        env["LOCAL_WORLD_SIZE"] = local
    code = "import os, diffex; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(policy)
