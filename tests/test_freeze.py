"""Tests for models.build and models.freeze: layer numbering, depth -> trainable tensors, BatchNorm
modes, that frozen weights and statistics really stay frozen, and weight loading (no network)."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import models
from models import ModelError, apply_unfreeze, build_model, load_pretrained, set_train_mode


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    # apply_unfreeze starts with requires_grad_(False) on the whole model, so one instance is shared.
    return build_model("resnet50", 100)


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _param_names(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


def _bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# ----------------------------------------------------------------------------------------------------
# unit module on resnet50: seed 000's published counts
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth, tensors", [(1, 2), (3, 5), (6, 10), (12, 19), (15, 25), (25, 40)])
def test_module_unit_resnet50_published_tensor_counts(resnet50, depth, tensors):
    plan = apply_unfreeze(resnet50, depth, "module", "resnet50")
    assert plan.trainable_tensors == tensors
    assert sum(p.requires_grad for p in resnet50.parameters()) == tensors
    assert plan.depth == depth
    assert len(plan.trainable_layers) == depth
    trainable = [p for p in resnet50.parameters() if p.requires_grad]
    assert plan.trainable_params == sum(p.numel() for p in trainable)
    assert plan.total_params == sum(p.numel() for p in resnet50.parameters())


def test_module_unit_depth1_trains_only_fc(resnet50):
    plan = apply_unfreeze(resnet50, 1, "module", "resnet50")
    assert plan.trainable_layers == ["fc"]
    assert _trainable_names(resnet50) == {"fc.weight", "fc.bias"}


def test_module_unit_depth3_trains_last_conv_bn_and_fc(resnet50):
    plan = apply_unfreeze(resnet50, 3, "module", "resnet50")
    assert plan.trainable_layers == ["fc", "layer4.2.bn3", "layer4.2.conv3"]
    assert _trainable_names(resnet50) == {
        "fc.weight", "fc.bias",
        "layer4.2.bn3.weight", "layer4.2.bn3.bias",
        "layer4.2.conv3.weight",
    }


def test_module_unit_downsample_counts_as_one_layer(resnet50):
    # layer4.0.downsample (conv + BN, 3 tensors) is one layer: it precedes layer4.0's last conv/bn in
    # registration order, so with 3 layers per block the depth that reaches it is predictable.
    names = [layer.name for layer in models.layers(resnet50, "module")]
    assert "layer4.0.downsample" in names
    assert not any(n.startswith("layer4.0.downsample.") for n in names)
    k = names.index("layer4.0.downsample") + 1
    apply_unfreeze(resnet50, k, "module", "resnet50")
    assert _param_names(resnet50.layer4[0].downsample, "layer4.0.downsample") <= _trainable_names(resnet50)


def test_module_unit_all_trains_everything(resnet50):
    plan = apply_unfreeze(resnet50, "all", "module", "resnet50")
    assert all(p.requires_grad for p in resnet50.parameters())
    assert plan.trainable_tensors == len(list(resnet50.parameters()))
    assert plan.trainable_params == plan.total_params
    assert plan.depth == plan.num_layers
    assert plan.frozen_bn == []


# ----------------------------------------------------------------------------------------------------
# unit block and unit stage on resnet50
# ----------------------------------------------------------------------------------------------------

def test_block_unit_resnet50(resnet50):
    plan = apply_unfreeze(resnet50, 1, "block", "resnet50")
    assert plan.num_layers == 18  # 16 bottleneck blocks + stem + fc
    assert plan.trainable_layers == ["fc"]
    assert _trainable_names(resnet50) == {"fc.weight", "fc.bias"}

    plan = apply_unfreeze(resnet50, 2, "block", "resnet50")
    assert plan.trainable_layers == ["fc", "layer4.2"]
    expected = _param_names(resnet50.layer4[2], "layer4.2") | {"fc.weight", "fc.bias"}
    assert _trainable_names(resnet50) == expected
    assert plan.trainable_tensors == len(expected)

    plan = apply_unfreeze(resnet50, "all", "block", "resnet50")
    assert plan.num_layers == 18
    assert all(p.requires_grad for p in resnet50.parameters())
    assert {"conv1.weight", "bn1.weight", "bn1.bias"} <= _trainable_names(resnet50)
    assert plan.trainable_layers[-1] == "stem"


def test_stage_unit_resnet50(resnet50):
    plan = apply_unfreeze(resnet50, 2, "stage", "resnet50")
    assert plan.num_layers == 6  # fc, layer4..layer1, stem
    assert plan.trainable_layers == ["fc", "layer4"]
    assert _trainable_names(resnet50) == _param_names(resnet50.layer4, "layer4") | {"fc.weight", "fc.bias"}

    plan = apply_unfreeze(resnet50, "all", "stage", "resnet50")
    assert plan.trainable_layers == ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert all(p.requires_grad for p in resnet50.parameters())


def test_reapplying_a_shallower_depth_refreezes(resnet50):
    apply_unfreeze(resnet50, "all", "module", "resnet50")
    plan = apply_unfreeze(resnet50, 1, "module", "resnet50")
    assert plan.trainable_tensors == 2
    assert _trainable_names(resnet50) == {"fc.weight", "fc.bias"}


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unit, n", [("module", 103), ("block", 18), ("stage", 6)])
def test_depth_beyond_model_raises_with_layer_count(resnet50, unit, n):
    with pytest.raises(ModelError) as err:
        apply_unfreeze(resnet50, n + 1, unit, "resnet50")
    assert f"{n} layers" in str(err.value)
    assert "resnet50" in str(err.value)
    # the largest legal depth works and equals "all"
    assert apply_unfreeze(resnet50, n, unit, "resnet50").trainable_tensors == len(list(resnet50.parameters()))


@pytest.mark.parametrize("depth", [0, -1])
def test_non_positive_depth_raises(resnet50, depth):
    with pytest.raises(ModelError):
        apply_unfreeze(resnet50, depth, "module", "resnet50")


def test_unknown_unit_lists_allowed_units(resnet50):
    with pytest.raises(ModelError) as err:
        apply_unfreeze(resnet50, 1, "neuron", "resnet50")
    msg = str(err.value)
    assert "neuron" in msg
    for unit in ("module", "block", "stage"):
        assert unit in msg


# ----------------------------------------------------------------------------------------------------
# BatchNorm modes
# ----------------------------------------------------------------------------------------------------

def test_set_train_mode_frozen_bn_eval_trainable_bn_train():
    model = build_model("resnet18", 10)
    plan = apply_unfreeze(model, 3, "module", "resnet18")  # fc, layer4.1.bn2, layer4.1.conv2
    model.eval()
    set_train_mode(model, plan)  # default frozen_bn="eval"
    bns = _bn_modules(model)
    assert bns["layer4.1.bn2"].training
    frozen = {n for n, m in bns.items() if not any(p.requires_grad for p in m.parameters())}
    assert frozen == set(bns) - {"layer4.1.bn2"}
    for n in frozen:
        assert not bns[n].training, n
    assert {id(m) for m in plan.frozen_bn} == {id(bns[n]) for n in frozen}
    # the rest of the network is in training mode
    assert model.training and model.fc.training and model.layer4[1].conv2.training


def test_set_train_mode_frozen_bn_train_puts_everything_in_train():
    model = build_model("resnet18", 10)
    plan = apply_unfreeze(model, 3, "module", "resnet18")
    model.eval()
    set_train_mode(model, plan, frozen_bn="train")
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# frozen really means frozen: a few optimizer steps
# ----------------------------------------------------------------------------------------------------

def _train_steps(frozen_bn: str, steps: int = 4):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    plan = apply_unfreeze(model, 3, "module", "resnet18")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    set_train_mode(model, plan, frozen_bn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, plan, before


def test_frozen_parameters_and_bn_statistics_unchanged_after_steps():
    model, plan, before = _train_steps("eval")
    after = model.state_dict()
    params = dict(model.named_parameters())
    frozen_params = [n for n, p in params.items() if not p.requires_grad]
    trainable_params = [n for n, p in params.items() if p.requires_grad]
    assert len(trainable_params) == plan.trainable_tensors == 5
    for n in frozen_params:
        assert torch.equal(after[n], before[n]), n
        assert params[n].grad is None, n
    for n in trainable_params:
        assert not torch.equal(after[n], before[n]), n
        assert params[n].grad is not None, n
    frozen_bn_names = [n for n, m in _bn_modules(model).items() if m in plan.frozen_bn]
    assert len(frozen_bn_names) == len(_bn_modules(model)) - 1
    for n in frozen_bn_names:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[f"{n}.{buf}"], before[f"{n}.{buf}"]), f"{n}.{buf}"
    # the trainable BN does update its statistics
    assert not torch.equal(after["layer4.1.bn2.running_mean"], before["layer4.1.bn2.running_mean"])
    assert after["layer4.1.bn2.num_batches_tracked"].item() == 4


def test_frozen_bn_train_mode_lets_statistics_drift():
    # seed 000's behaviour: the check above would catch it
    model, plan, before = _train_steps("train")
    after = model.state_dict()
    for bn in ("bn1", "layer1.0.bn1", "layer3.1.bn2"):
        assert not torch.equal(after[f"{bn}.running_mean"], before[f"{bn}.running_mean"]), bn
        assert not torch.equal(after[f"{bn}.running_var"], before[f"{bn}.running_var"]), bn
        assert after[f"{bn}.num_batches_tracked"].item() == 4
    # frozen parameters (affine weights) still do not change
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n


# ----------------------------------------------------------------------------------------------------
# the frozen prefix builds no autograd graph
# ----------------------------------------------------------------------------------------------------

def _outputs_requiring_grad(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    seen: dict[str, bool] = {}
    handles = []
    for name, module in model.named_modules():
        if name and all(not p.requires_grad for p in module.parameters()):
            def hook(_m, _inp, out, name=name):
                seen[name] = out.requires_grad
            handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_frozen_prefix_outputs_do_not_require_grad():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    plan = apply_unfreeze(model, 1, "module", "resnet18")
    set_train_mode(model, plan)
    seen = _outputs_requiring_grad(model, torch.randn(2, 3, 32, 32))
    assert {"conv1", "layer1", "layer4", "layer4.1.bn2", "avgpool"} <= set(seen)
    assert not any(seen.values()), [n for n, r in seen.items() if r]


def test_hook_check_detects_graph_after_first_trainable_layer():
    # the check above is able to fail: at depth 3 the output of layer4.1.conv2 needs grad
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    apply_unfreeze(model, 3, "module", "resnet18")
    seen = _outputs_requiring_grad(model, torch.randn(2, 3, 32, 32))
    assert seen["layer4.1.conv1"] is False
    assert seen["layer4.1.relu"] is True  # applied after the trainable conv2/bn2
    assert seen["avgpool"] is True


def _saved_tensors(model: nn.Module, depth) -> int:
    plan = apply_unfreeze(model, depth, "module", "resnet18")
    set_train_mode(model, plan)
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert loss.requires_grad
    return count


def test_frozen_prefix_saves_almost_nothing_for_backward():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    head_only = _saved_tensors(model, 1)
    everything = _saved_tensors(model, "all")
    assert 0 < head_only <= 5
    assert everything > 20 * head_only


# ----------------------------------------------------------------------------------------------------
# build_model / load_pretrained
# ----------------------------------------------------------------------------------------------------

def test_load_pretrained_from_state_dict_file(tmp_path):
    torch.manual_seed(123)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    state = load_pretrained("resnet18", str(path))
    assert state is not None and "fc.weight" in state
    torch.manual_seed(0)  # a different init: equal weights can only come from the file
    model = build_model("resnet18", 7, state)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert isinstance(model.fc, nn.Linear)
    assert model.fc.out_features == 7 and model.fc.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_load_pretrained_unwraps_checkpoint(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    state = load_pretrained("resnet18", str(path))
    assert torch.equal(state["conv1.weight"], source.conv1.weight)


def test_load_pretrained_none_returns_none():
    assert load_pretrained("resnet18", "none") is None


def test_load_pretrained_missing_file(tmp_path):
    with pytest.raises(ModelError) as err:
        load_pretrained("resnet18", str(tmp_path / "missing.pt"))
    assert "missing.pt" in str(err.value)


def test_load_pretrained_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a state dict \x00\x01\x02" * 10)
    with pytest.raises(ModelError):
        load_pretrained("resnet18", str(path))


def test_load_pretrained_without_fc_weight(tmp_path):
    path = tmp_path / "nofc.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ModelError) as err:
        load_pretrained("resnet18", str(path))
    assert "fc.weight" in str(err.value)


def test_build_model_with_mismatched_weights(tmp_path):
    state = torchvision.models.resnet34(weights=None).state_dict()
    with pytest.raises(ModelError) as err:
        build_model("resnet18", 10, state)
    assert "resnet18" in str(err.value)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    return calls


def test_load_pretrained_imagenet_offline_suggests_weights_none(no_network):
    with pytest.raises(ModelError) as err:
        load_pretrained("resnet18", "imagenet")
    assert "--weights none" in str(err.value)
    assert len(no_network) == 1
    assert no_network[0] == torchvision.models.ResNet18_Weights.DEFAULT


def test_load_pretrained_imagenet_bad_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def bad_hash(self, *args, **kwargs):
        raise RuntimeError('invalid hash value (expected "f37072fd", got "00000000")')

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", bad_hash)
    with pytest.raises(ModelError) as err:
        load_pretrained("resnet50", "imagenet")
    assert "--weights none" in str(err.value)


def test_load_pretrained_imagenet_uses_default_enum(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fake = {"fc.weight": torch.zeros(1000, 512)}
    got = []

    def cached(self, *args, **kwargs):
        got.append(self)
        return fake

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", cached)
    assert load_pretrained("resnet18", "imagenet") is fake
    assert got == [torchvision.models.ResNet18_Weights.DEFAULT]


def test_unknown_model_lists_choices():
    for call in (lambda: build_model("resnet9000", 10), lambda: load_pretrained("resnet9000", "none")):
        with pytest.raises(ModelError) as err:
            call()
        msg = str(err.value)
        assert "resnet9000" in msg
        assert "resnet18" in msg and "resnet50" in msg


def test_unknown_head_lists_choices():
    with pytest.raises(ModelError) as err:
        build_model("resnet18", 10, head="transformer")
    assert "linear" in str(err.value)
