"""The CNN v2, ghost batch norm under micro-batching, and loading a base model for fine-tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnn_finetune.files.checkpoint import save_checkpoint
from cnn_finetune.errors import UserError
from cnn_finetune.model.cnn import ARCH, GhostBatchNorm2d, build_model, count_parameters, deferred_bn_stats, unwrap
from cnn_finetune.model.loading import adapt_state_dict, load_base_model
from cnn_finetune.training.microbatch import split_for_micro_batches

DIGITS = [str(i) for i in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("num_classes", [2, 10, 47])
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes_and_size(num_classes: int, batch: int) -> None:
    torch.manual_seed(0)
    model = build_model(num_classes)
    assert 100_000 < count_parameters(model) < 1_000_000
    x = torch.randn(batch, 1, 28, 28)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (batch, num_classes) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.arch_params() == {"num_classes": num_classes, "width": 32, "bn_ghost_size": 32}


def test_unwrap_strips_wrappers() -> None:
    model = build_model(10, width=4)
    ddp_like = torch.nn.Module()
    ddp_like.module = model  # DistributedDataParallel keeps the model here
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = ddp_like  # torch.compile keeps it here
    assert unwrap(compiled_like) is model and unwrap(ddp_like) is model and unwrap(model) is model


# ------------------------------------------------------------------------------------------------
# Ghost batch norm


def test_ghost_groups_are_normalised_independently() -> None:
    torch.manual_seed(1)
    bn = GhostBatchNorm2d(3, ghost_size=4)
    x = torch.randn(10, 3, 5, 5) * 3 + 1
    assert bn.group_sizes(10) == [4, 4, 2] and bn.group_sizes(4) == [4] and bn.group_sizes(3) == [3]
    y = bn(x)
    plain = torch.nn.BatchNorm2d(3)
    expected = torch.cat([plain(x[0:4]), plain(x[4:8]), plain(x[8:10])])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # one running-stat update per batch: the mean of the groups' updates
    momentum = 0.1
    means = torch.stack([x[s].mean(dim=(0, 2, 3)) for s in (slice(0, 4), slice(4, 8), slice(8, 10))])
    torch.testing.assert_close(bn.running_mean, (momentum * means).mean(0))
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


@pytest.mark.parametrize("batch, ghost, parts, sizes", [
    (64, 16, 2, [32, 32]),
    (64, 16, 4, [16, 16, 16, 16]),
    (50, 16, 3, [16, 32, 2]),
    (50, 16, 8, [16, 16, 16, 2]),
    (10, 16, 4, [10]),
    (7, 0, 3, [7]),  # no ghost groups: batch norm sees the whole batch, which must not be split
])
def test_split_for_micro_batches_cuts_between_groups(batch: int, ghost: int, parts: int, sizes: list[int]) -> None:
    model = build_model(3, width=2, bn_ghost_size=ghost)
    assert split_for_micro_batches(model, batch, parts) == sizes


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: list[int], defer: bool = True) -> dict[str, torch.Tensor]:
    """One forward/backward over ``sizes`` micro-batches, loss scaled as for the whole batch."""
    model.zero_grad(set_to_none=True)
    with deferred_bn_stats(model, enabled=defer):
        start = 0
        for n in sizes:
            loss = F.cross_entropy(model(x[start:start + n]), y[start:start + n], reduction="sum") / len(x)
            loss.backward()
            start += n
    result = {f"grad.{k}": p.grad.clone() for k, p in model.named_parameters()}
    result.update({f"buffer.{k}": b.clone() for k, b in model.named_buffers()})
    return result


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("batch, parts", [(64, 2), (64, 4), (50, 2), (50, 3), (50, 4), (40, 2), (13, 2)])
def test_micro_batches_match_the_whole_batch(batch: int, parts: int, dtype: torch.dtype, atol: float) -> None:
    """Same gradients and running statistics: exactly in float64, up to float32 rounding otherwise."""
    torch.manual_seed(2)
    model = build_model(5, width=4, bn_ghost_size=16).train().to(dtype)
    x = torch.randn(batch, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, 5, (batch,))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _train_step(model, x, y, [batch])
    model.load_state_dict(start)
    sizes = split_for_micro_batches(model, batch, parts)
    assert sum(sizes) == batch and len(sizes) == min(parts, -(-batch // 16))
    micro = _train_step(model, x, y, sizes)
    assert whole.keys() == micro.keys()
    for k in whole:
        torch.testing.assert_close(micro[k], whole[k], atol=atol, rtol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert int(micro["buffer.features.0.1.num_batches_tracked"]) == 1


def test_without_deferral_running_stats_would_differ() -> None:
    # The check above has teeth: applying each micro-batch's update on its own gives other statistics.
    torch.manual_seed(3)
    model = build_model(5, width=4, bn_ghost_size=16).train()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 5, (64,))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _train_step(model, x, y, [64])
    model.load_state_dict(start)
    eager = _train_step(model, x, y, [32, 32], defer=False)
    key = "buffer.features.0.1.running_mean"
    # momentum applied twice: roughly 0.19 instead of 0.1 of the batch mean
    assert (eager[key] - whole[key]).abs().max() > 0.5 * whole[key].abs().max()
    assert int(eager["buffer.features.0.1.num_batches_tracked"]) == 2


def test_deferred_stats_are_dropped_when_the_step_fails() -> None:
    model = build_model(3, width=2, bn_ghost_size=8).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(RuntimeError, match="simulated"):
        with deferred_bn_stats(model):
            model(torch.randn(16, 1, 28, 28))
            raise RuntimeError("simulated out of memory")
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    model(torch.randn(16, 1, 28, 28))  # and normal updates resume afterwards
    assert int(model.features[0][1].num_batches_tracked) == 1


# ------------------------------------------------------------------------------------------------
# Base model -> fine-tuning model


def base_model(num_classes: int = 10, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(100)
    model = build_model(num_classes, width=width)
    with torch.no_grad():
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.add_(0.5)  # distinctive running stats, so that copying them is visible
    return model


def save_as_checkpoint(model: torch.nn.Module, path: Path, class_names: list[str]) -> Path:
    save_checkpoint({"arch": ARCH, "arch_params": model.arch_params(), "model": model.state_dict(), "class_names": class_names}, path)
    return path


def fresh(num_classes: int, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(200)
    return build_model(num_classes, width=width)


def assert_features_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if k.startswith("features."):
            assert torch.equal(sa[k], sb[k]), k


def save_base(base: torch.nn.Module, folder: Path, saved_as: str) -> Path:
    """A digits base model as this program saves it ("checkpoint") or as a plain state dict."""
    if saved_as == "checkpoint":
        return save_as_checkpoint(base, folder / "best_model.pth", DIGITS)
    path = folder / "weights.pth"
    torch.save(base.state_dict(), path)
    return path


@pytest.mark.parametrize("saved_as", ["checkpoint", "state_dict"])
def test_same_classes_keep_the_head(tmp_path: Path, saved_as: str) -> None:
    base = base_model()
    path = save_base(base, tmp_path, saved_as)
    model = fresh(10)
    message = load_base_model(model, path, DIGITS)
    assert "all layers loaded" in message and str(path) in message
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("saved_as", ["checkpoint", "state_dict"])
def test_other_class_count_replaces_the_head_keeps_features(tmp_path: Path, saved_as: str) -> None:
    base = base_model(10)
    letters = list("ABCDEFGHIJKL")
    path = save_base(base, tmp_path, saved_as)
    model = fresh(12)
    untouched_head = fresh(12).head.weight.detach().clone()
    message = load_base_model(model, path, letters)
    assert "classifier head new (0 of 12 classes carried over)" in message
    assert_features_equal(model, base)
    assert model.head.weight.shape == (12, 32)
    assert torch.equal(model.head.weight, untouched_head)  # the fresh initialisation, not the base's


def test_shared_classes_keep_their_head_rows(tmp_path: Path) -> None:
    base = base_model(10)
    path = save_as_checkpoint(base, tmp_path / "best_model.pth", DIGITS)
    names = ["1", "7", "A", "B"]
    model = fresh(len(names))
    untouched = fresh(len(names)).head
    message = load_base_model(model, path, names)
    assert "2 of 4 classes carried over" in message
    assert_features_equal(model, base)
    for row, name in enumerate(names):
        src = (base.head.weight[DIGITS.index(name)], base.head.bias[DIGITS.index(name)]) if name in DIGITS else (untouched.weight[row], untouched.bias[row])
        assert torch.equal(model.head.weight[row], src[0]) and torch.equal(model.head.bias[row], src[1]), name


def test_class_order_follows_the_new_names() -> None:
    base = base_model(3)
    model = fresh(3)
    message = adapt_state_dict(model, base.state_dict(), ["a", "b", "c"], ["c", "a", "b"], "base.pth")
    assert "all layers loaded" in message
    assert torch.equal(model.head.weight, base.head.weight[[2, 0, 1]])
    assert torch.equal(model.head.bias, base.head.bias[[2, 0, 1]])


def test_width_mismatch_is_a_clear_user_error(tmp_path: Path) -> None:
    path = save_as_checkpoint(base_model(10, width=8), tmp_path / "best_model.pth", DIGITS)
    model = fresh(10, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_base_model(model, path, DIGITS)
    text = str(info.value)
    assert str(path) in text and "features.0.0.weight" in text and "(8, 1, 3, 3)" in text and "--width" in text
    assert info.value.exit_code == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "a failed load must leave the model untouched"


def test_foreign_or_broken_files_are_user_errors(tmp_path: Path) -> None:
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3)}, other)
    with pytest.raises(UserError, match="is not a CNN v2"):
        load_base_model(fresh(10), other, DIGITS)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a model")
    with pytest.raises(UserError, match="base model cannot be used"):
        load_base_model(fresh(10), garbage, DIGITS)
