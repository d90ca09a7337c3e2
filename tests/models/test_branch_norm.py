"""Branch-specific normalisation: wrapping, branch routing, separate running statistics, clean export."""

import copy

import pytest
import torch
from torch import nn

from advmim_pl.models.branch_norm import BranchNorm, add_branch_norms, branch, clean_state_dict


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
    )


def stats(module: nn.Module, which: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if f".{which}." in k and "running" in k}


def test_wraps_every_layernorm_of_a_vit(micro_encoder):
    enc = micro_encoder()
    before = sum(isinstance(m, nn.LayerNorm) for m in enc.modules())
    assert before > 0
    assert add_branch_norms(enc) == before
    wrappers = [m for m in enc.modules() if isinstance(m, BranchNorm)]
    assert len(wrappers) == before
    # every LayerNorm left sits inside a BranchNorm (one clean, one aux copy each)
    inside = {id(w.clean) for w in wrappers} | {id(w.aux) for w in wrappers}
    lns = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 2 * before and all(id(m) in inside for m in lns)
    # a second call finds nothing new to wrap
    assert add_branch_norms(enc) == 0


def test_wrapped_vit_clean_branch_is_unchanged(micro_encoder, images):
    enc = micro_encoder().eval()
    x = images(batch=2)
    with torch.no_grad():
        before = enc.forward_features(x)
        add_branch_norms(enc)
        after = enc.forward_features(x)
        for m in enc.modules():
            if isinstance(m, BranchNorm):
                nn.init.constant_(m.aux.weight, 2.0)
        with branch(enc, "aux"):
            aux = enc.forward_features(x)
        clean_again = enc.forward_features(x)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(clean_again, before, atol=0, rtol=0)
    assert not torch.allclose(aux, before, atol=1e-3)


@pytest.mark.parametrize("active, idle", [("aux", "clean"), ("clean", "aux")])
def test_running_stats_update_only_on_active_branch(active, idle):
    net = bn_net()
    assert add_branch_norms(net) == 3
    net.train()
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    idle_before = stats(net, idle)
    active_before = stats(net, active)
    assert len(idle_before) == 4  # running_mean / running_var of the two BatchNorms
    with branch(net, active):
        net(x)
    for key, value in stats(net, idle).items():
        assert torch.equal(value, idle_before[key]), key
    for key, value in stats(net, active).items():
        assert not torch.equal(value, active_before[key]), key
    tracked = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" in k}
    assert all(int(v) == (1 if f".{active}." in k else 0) for k, v in tracked.items())


def test_branch_restores_previous_state_even_on_exception():
    net = bn_net()
    add_branch_norms(net)
    norms = [m for m in net.modules() if isinstance(m, BranchNorm)]
    assert all(m.active == "clean" for m in norms)
    with branch(net, "aux"):
        assert all(m.active == "aux" for m in norms)
        with pytest.raises(RuntimeError, match="boom"):
            with branch(net, "clean"):
                assert all(m.active == "clean" for m in norms)
                raise RuntimeError("boom")
        assert all(m.active == "aux" for m in norms)
    assert all(m.active == "clean" for m in norms)
    with pytest.raises(KeyError):
        with branch(net, "aux"):
            raise KeyError("x")
    assert all(m.active == "clean" for m in norms)


def test_aux_branch_selects_aux_parameters():
    norm = BranchNorm(nn.LayerNorm(4))
    nn.init.constant_(norm.aux.bias, 5.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), nn.functional.layer_norm(x, (4,), eps=1e-5))
    with branch(norm, "aux"):
        torch.testing.assert_close(norm(x), nn.functional.layer_norm(x, (4,), eps=1e-5) + 5.0)


def test_clean_state_dict_keys_and_values():
    net = bn_net()
    plain = copy.deepcopy(net)
    add_branch_norms(net)
    net.train()
    # make the branches differ: different statistics and affine parameters
    with branch(net, "aux"):
        net(torch.randn(8, 1, 6, 6) * 5)
    net(torch.randn(8, 1, 6, 6))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BranchNorm):
                m.aux.weight.add_(1.0)
                m.clean.bias.add_(0.5)
    exported = clean_state_dict(net.state_dict())
    assert set(exported) == set(plain.state_dict())
    full = net.state_dict()
    for key, value in exported.items():
        parts = key.split(".")
        wrapped = ".".join(parts[:-1] + ["clean", parts[-1]])
        source = full[wrapped] if wrapped in full else full[key]
        assert torch.equal(value, source), key
    # and it loads strictly into the unwrapped architecture, reproducing the clean branch
    plain.load_state_dict(exported, strict=True)
    net.eval(), plain.eval()
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), atol=0, rtol=0)


def test_clean_state_dict_of_wrapped_vit_loads_into_unwrapped(micro_encoder, images):
    enc = micro_encoder()
    plain = copy.deepcopy(enc)
    add_branch_norms(enc)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, BranchNorm):
                m.aux.weight.mul_(3.0)
                m.clean.bias.add_(0.1)
    exported = clean_state_dict(enc.state_dict())
    assert set(exported) == set(plain.state_dict())
    plain.load_state_dict(exported, strict=True)
    enc.eval(), plain.eval()
    x = images(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), enc.forward_features(x), atol=0, rtol=0)


def test_clean_state_dict_of_unwrapped_module_is_identity(micro_encoder):
    state = micro_encoder().state_dict()
    exported = clean_state_dict(state)
    assert list(exported) == list(state)
    assert all(exported[k] is state[k] for k in state)
