"""Tests for models.split: the split model computes what the whole model computes (outputs and
gradients), the trunk builds no graph and stays in eval mode, and the cut lands where it should."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from models import apply_unfreeze, build_model, set_train_mode
from models.split import SplitModel, split_frozen


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_model("resnet18", 10)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(forward, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = forward(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in _trainable(model).items()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("unit, depth, cut", [
    ("module", 1, "fc"),
    ("module", 2, "layer4.1"),        # layer4.1.bn2: the cut moves to the start of the block
    ("module", 3, "layer4.1"),
    ("module", 8, "layer4.0"),        # through layer4.0's downsample
    ("module", 12, "layer3.1"),
    ("block", 1, "fc"),
    ("block", 3, "layer4.0"),
    ("stage", 2, "layer4.0"),
    ("stage", 3, "layer3.0"),
])
def test_split_matches_the_whole_model(resnet18, unit, depth, cut):
    model = copy.deepcopy(resnet18).to(memory_format=torch.channels_last)
    plan = apply_unfreeze(model, depth, unit, "resnet18")
    split = split_frozen(model)
    assert isinstance(split, SplitModel) and split.cut == cut
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 5, 9])
    running = {n: b.clone() for n, b in model.named_buffers() if n.startswith(("conv1", "bn1", "layer1"))}

    # Training mode, frozen BatchNorm in eval: trainable BN layers in the tail use batch statistics.
    set_train_mode(model, plan)
    ref_out, ref_grads = _loss_and_grads(model, model, x, y)
    split.train()
    out, grads = _loss_and_grads(split, model, x, y)
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)

    # The trunk builds no graph, so none of its activations are kept for backward.
    feats = split.trunk_features(x)
    assert feats.requires_grad is False and feats.grad_fn is None
    assert all(p.grad is None for p in split.trunk.parameters())
    assert all(not p.requires_grad for p in split.trunk.parameters())
    # Frozen statistics of the trunk did not move.
    for n, b in running.items():
        torch.testing.assert_close(model.get_buffer(n), b)

    # Evaluation: the same logits.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(split.eval()(x), model(x))


def test_trunk_and_tail_share_the_models_modules(resnet18):
    model = copy.deepcopy(resnet18)
    apply_unfreeze(model, 2, "block", "resnet18")
    split = split_frozen(model)
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in split.parameters()} == model_params  # every parameter, no copies
    assert split.tail.layer4_1 is model.layer4[1] and split.tail.fc is model.fc
    with torch.no_grad():
        split.tail.fc.bias.add_(1.0)  # training the split trains the model
    assert torch.equal(model.fc.bias, split.tail.fc.bias)
    assert set(model.state_dict()) == set(build_model("resnet18", 10).state_dict())


def test_train_keeps_trunk_and_frozen_tail_bn_in_eval(resnet18):
    model = copy.deepcopy(resnet18)
    apply_unfreeze(model, 3, "module", "resnet18")  # fc, layer4.1.bn2, layer4.1.conv2
    split = split_frozen(model).train()
    assert split.cut == "layer4.1"
    assert not any(m.training for m in split.trunk.modules())
    assert not model.layer4[1].bn1.training          # frozen BN inside the tail block
    assert model.layer4[1].bn2.training and model.fc.training
    split.eval()
    assert not any(m.training for m in split.modules())


def test_cut_inside_a_bottleneck_resnet50():
    model = torchvision.models.resnet50(num_classes=10)
    plan = apply_unfreeze(model, 3, "module", "resnet50")   # fc, layer4.2.bn3, layer4.2.conv3
    assert plan.trainable_layers[-1] == "layer4.2.conv3"
    split = split_frozen(model)
    assert split.cut == "layer4.2"
    assert split.tail[0] is model.layer4[2]
    assert [type(m) for m in split.tail][1:] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    set_train_mode(model, plan)
    split.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    ref_out, ref_grads = _loss_and_grads(model, model, x, y)
    out, grads = _loss_and_grads(split, model, x, y)
    torch.testing.assert_close(out, ref_out)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    # The block's frozen convolutions run in the tail without gradients.
    split(x).sum().backward()
    assert model.layer4[2].conv1.weight.grad is None and model.layer4[2].conv3.weight.grad is not None
    assert split_frozen(model) is not None and apply_unfreeze(model, 25, "module").trainable_layers[-1] == "layer3.5.bn1"
    assert split_frozen(model).cut == "layer3.5"


def test_nothing_to_cut_gives_none(resnet18):
    model = copy.deepcopy(resnet18)
    apply_unfreeze(model, "all", "module", "resnet18")
    assert split_frozen(model) is None                         # conv1 trains
    model.requires_grad_(False)
    assert split_frozen(model) is None                         # nothing trains

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.a(x))
    custom = Custom()
    custom.a.requires_grad_(False)
    assert split_frozen(custom) is None                        # unknown forward


def test_simple_cnn_cut_before_dropout():
    model = build_model("simple_cnn", 10)
    plan = apply_unfreeze(model, 1, "module", "simple_cnn")
    split = split_frozen(model)
    # hidden = Flatten, Linear, ReLU, Dropout: the eval trunk must not swallow the dropout.
    assert split.cut == "hidden.3"
    x = torch.randn(3, 3, 32, 32)
    set_train_mode(model, plan)
    split.train()
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(split(x), ref)


def test_sequential_and_head_children():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    model[0].requires_grad_(False)
    model[2][0].requires_grad_(False)
    split = split_frozen(model)
    assert split.cut == "2.1"
    x = torch.randn(5, 4)
    torch.testing.assert_close(split(x), model(x))


def test_mlp_head_cut_before_its_dropout():
    model = build_model("resnet18", 10, head="mlp")  # fc = Linear, ReLU, Dropout, Linear
    apply_unfreeze(model, 1, "module", "resnet18")     # only fc.3 trains
    split = split_frozen(model)
    assert split.cut == "fc.2"
    assert isinstance(split.tail[0], nn.Dropout) and split.tail[1] is model.fc[3]
