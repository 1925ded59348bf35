"""CUDA checks (run with `make test-gpu` on a machine with a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kfcrun.logging import read_metrics
from kfcrun.models import build_model
from kfcrun.optim import KFCPre
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu on a GPU machine)"
    ),
]


def test_kfc_pre_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu_model = build_model("cuda_convnet").double()
    gpu_model = build_model("cuda_convnet").double().cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64) * 60
    y = torch.randint(0, 10, (64,))
    settings = dict(
        lr=0.1, weight_decay=0.004, damping=1.0, stats_every=1, inverse_every=1, clip=None, seed=0
    )
    cpu_opt, gpu_opt = KFCPre(cpu_model, **settings), KFCPre(gpu_model, **settings)
    # the sampled targets come from device-specific generators: use the expected values instead
    cpu_opt.curvature.fisher_type = gpu_opt.curvature.fisher_type = "expected"
    for model, opt, inputs, labels in ((cpu_model, cpu_opt, x, y), (gpu_model, gpu_opt, x.cuda(), y.cuda())):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            opt.step()
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values(), strict=True):
        torch.testing.assert_close(
            b.cpu(), a, rtol=1e-6, atol=1e-9, msg=f"{name} differs between CPU and CUDA"
        )


def test_smoke_run_on_cuda(tmp_path: Path, cache_dir: Path):
    result = run_cli(
        [
            "experiment=smoke",
            "optimizer=kfc_pre",
            "optimizer.init_examples=256",
            "trainer.device=cuda",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path / "run")[-1]["test/error"] < 0.7


def test_target_sampling_never_synchronizes():
    """The sampled-Fisher targets are drawn on the device: no host sync (multinomial would need one)."""
    from kfcrun.curvature import SoftmaxCrossEntropy

    logits = torch.randn(512, 10, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    lik = SoftmaxCrossEntropy()
    lik.sample(logits, generator)  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        draws = lik.sample(logits, generator)
        omega_input = torch.randn(64, 8, 16, 16, device="cuda")
        from kfcrun.curvature.omega_lagged import conv_omega_lagged

        omega = conv_omega_lagged(omega_input, 3, padding=((1, 1), (1, 1)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert draws.shape == (512,) and int(draws.min()) >= 0 and int(draws.max()) <= 9
    assert omega.shape == (73, 73)


def test_lagged_omega_on_cuda_matches_cpu():
    from kfcrun.curvature import kron_math
    from kfcrun.curvature.omega_lagged import conv_omega_lagged

    x = torch.randn(16, 4, 9, 8, dtype=torch.float64).relu()
    padding = kron_math.conv_padding(5, 1, "same", 1)
    cpu = kron_math.conv_omega(x, 5, padding=padding)
    gpu = conv_omega_lagged(x.cuda(), 5, padding=padding)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12 * cpu.abs().max().item())
