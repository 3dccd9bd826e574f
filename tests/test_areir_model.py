"""AREIR network: published parameter counts, batched formulations == loop, checkpointing, deterministic eval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from areir.model import AREIRNet, AREIRNetConfig, count_parameters

# The reference's published table (CARS196/CUB200: E=48, M=12).
PUBLISHED = {
    ("resnet18", False): 529_365_376,
    ("resnet34", False): 1_011_079_808,
    ("resnet50", False): 1_118_974_592,
    ("resnext50_32x4d", False): 1_094_093_696,
    ("resnet18", True): 529_561_984,
    ("resnet34", True): 1_011_276_416,
    ("resnet50", True): 1_122_120_320,
    ("resnext50_32x4d", True): 1_097_239_424,
}


@pytest.mark.parametrize("arch,with_se", list(PUBLISHED))
def test_parameter_count_matches_published_table(arch: str, with_se: bool) -> None:
    with torch.device("meta"):
        net = AREIRNet(AREIRNetConfig(arch, members=48, meta_classes=12, with_se=with_se))
    n = count_parameters(net)
    print(f"{'se-' if with_se else ''}{arch}: {n:,}")
    assert n == PUBLISHED[arch, with_se]


def test_stem_is_shared_and_members_are_independent() -> None:
    with torch.device("meta"):
        one = AREIRNet(AREIRNetConfig("resnet18", 1, 12, False))
        two = AREIRNet(AREIRNetConfig("resnet18", 2, 12, False))
    stem = count_parameters(one.stem)
    assert stem == 157_504 == count_parameters(two.stem)
    assert count_parameters(two) - stem == 2 * (count_parameters(one) - stem)


def run_step(net: AREIRNet, images: torch.Tensor, targets: torch.Tensor, seed: int = 0):
    """One training forward/backward from a fixed RNG state: (logits, grads, buffers)."""
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same branch weights for every formulation
    logits = net(images)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    return logits.detach(), grads, buffers


@pytest.mark.parametrize(
    "arch,with_se,random_weighting,pool_grid",
    [("resnet18", True, True, 1), ("resnext50_32x4d", False, False, 1), ("resnet18", False, False, 2),
     ("cnn_small", True, False, 1)],
)
def test_batched_formulations_equal_the_loop(arch: str, with_se: bool, random_weighting: bool,
                                             pool_grid: int) -> None:
    """Same weights -> same logits, gradients and BatchNorm updates, in float64 (where the formulations agree to
    ~1e-15; in float32, train-mode BatchNorm over a few images at 1x1 resolution amplifies summation-order noise)."""
    torch.manual_seed(0)
    e, m = 2, 4
    net = AREIRNet(AREIRNetConfig(arch, e, m, with_se, random_weighting=random_weighting, member_impl="loop",
                   pool_grid=pool_grid)).double().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)  # small: float64 convolutions are slow on CPU
    targets = torch.randint(0, m, (3, e))
    tight = {"atol": 1e-10, "rtol": 1e-8}

    ref_logits, ref_grads, ref_buffers = run_step(net, images, targets)
    assert ref_logits.shape == (3, e, m)
    for impl in ("grouped", "vmap"):
        net.load_state_dict(state)
        net.member_impl = impl
        logits, grads, buffers = run_step(net, images, targets)
        torch.testing.assert_close(logits, ref_logits, **tight)
        for name, g in ref_grads.items():  # relative: tiny maps make train-mode BatchNorm gradients huge
            assert (grads[name] - g).norm() <= 1e-9 * g.norm(), f"{impl}: grad of {name}"
        for name, b in ref_buffers.items():  # running stats (and step counters) updated identically
            torch.testing.assert_close(buffers[name], b, **tight, msg=f"{impl}: buffer {name}")
        net.eval()
        with torch.no_grad():
            net.member_impl = "loop"
            loop_eval = net(images)
            net.member_impl = impl
            torch.testing.assert_close(net(images), loop_eval, **tight)
        net.train()


def test_grouped_equals_loop_in_float32() -> None:
    """The production dtype: agreement at float32 rounding level (64 px so BatchNorm sees 2x2 maps in layer4)."""
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 2, 4, True, member_impl="loop")).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 4, (4, 2))
    ref_logits, ref_grads, _ = run_step(net, images, targets)
    net.load_state_dict(state)
    net.member_impl = "grouped"
    logits, grads, _ = run_step(net, images, targets)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_members_differ_after_init() -> None:
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 3, 4, False)).eval()
    logits = net(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(logits[:, 0], logits[:, 1])


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_activation_checkpointing_is_exact(impl: str) -> None:
    """Same gradients, and BatchNorm running stats updated once (not again during recomputation)."""
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 2, 3, True, member_impl=impl)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images, targets = torch.randn(3, 3, 16, 16), torch.randint(0, 3, (3, 2))
    ref_logits, ref_grads, ref_buffers = run_step(net, images, targets)
    net.load_state_dict(state)
    net.checkpoint_members = True
    logits, grads, buffers = run_step(net, images, targets)
    torch.testing.assert_close(logits, ref_logits)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    for name, b in ref_buffers.items():
        torch.testing.assert_close(buffers[name], b, msg=name)


def test_evaluation_is_deterministic_with_random_weighting() -> None:
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 3, 4, True, random_weighting=True))
    images = torch.randn(4, 3, 32, 32)
    net.train()
    first_train = net(images).detach()
    assert not torch.equal(first_train, net(images).detach())  # training draws new branch weights (and BN stats)
    net.eval()
    with torch.no_grad():
        a = net(images)
        torch.rand(10)  # RNG state moves on
        b = net(images)
    assert torch.equal(a, b)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="member_impl"):
        AREIRNet(AREIRNetConfig("resnet18", 2, 2, member_impl="threads"))
    with pytest.raises(ValueError, match="arch"):
        AREIRNet(AREIRNetConfig("vgg16", 2, 2))
    with pytest.raises(ValueError, match="checkpoint_members"):
        AREIRNet(AREIRNetConfig("resnet18", 2, 2, member_impl="vmap", checkpoint_members=True))


def test_sync_batchnorm_conversion_covers_stem_and_members() -> None:
    """What Lightning does for trainer.sync_batchnorm=true: every BatchNorm becomes a SyncBatchNorm and the grouped
    forward is unchanged (outside a process group SyncBatchNorm computes plain batch statistics)."""
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 2, 3, True, member_impl="grouped")).train()
    images = torch.randn(2, 3, 32, 32)
    synced = AREIRNet(AREIRNetConfig("resnet18", 2, 3, True, member_impl="grouped"))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced)
    synced.train()
    synced.load_state_dict(net.state_dict())
    bns = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert any(m.num_features == 2 * 128 for m in bns)  # member BatchNorms span all E*C channels
    torch.testing.assert_close(synced(images), net(images))


def test_auto_formulation_is_grouped_on_gpu_and_loop_on_cpu() -> None:
    with torch.device("meta"):
        net = AREIRNet(AREIRNetConfig("resnet18", 2, 2))
    assert net.member_impl == "auto"
    assert net.resolved_impl(torch.device("cuda")) == "grouped" and net.resolved_impl(torch.device("cpu")) == "loop"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_equals_loop_on_gpu_bf16() -> None:
    torch.manual_seed(0)
    net = AREIRNet(AREIRNetConfig("resnet18", 4, 12, True, member_impl="loop")).cuda().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(8, 3, 128, 128, device="cuda")
    outs = {}
    for impl in ("loop", "grouped"):
        net.load_state_dict(state)
        net.member_impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = net(images).float()
    torch.testing.assert_close(outs["grouped"], outs["loop"], atol=5e-2, rtol=5e-2)


def test_member_width_sets_the_cnn_small_members_budget() -> None:
    """Equal-budget comparisons: thinner members, more of them (bench/areir_claim.py)."""
    def member_params(members: int, width: int | None) -> int:
        return count_parameters(AREIRNet(AREIRNetConfig("cnn_small", members, 8, True, member_width=width)).members)

    assert member_params(1, None) == member_params(1, 128)
    assert member_params(4, 32) < member_params(1, 128) < member_params(4, 128)
    assert member_params(16, 32) == 16 * member_params(1, 32)
    with pytest.raises(ValueError, match="member_width applies to cnn_small"):
        AREIRNet(AREIRNetConfig("resnet18", 2, 4, False, member_width=32))
