"""The pooling a classifier defaults to is the ``pooling`` attribute of the method that pre-trained its encoder."""

import pytest

from advmim_pl.mim import MAE, MIMMethod, SimMIM
from advmim_pl.models.pooling import method_class, method_pooling, resolve_pooling


class PatchPooled(MIMMethod):
    """A method declared outside advmim_pl.mim, found by its class path."""

    pooling = "avg"


def test_the_method_class_is_found_by_class_path_or_by_the_name_a_checkpoint_records():
    assert method_class("advmim_pl.mim.methods.SimMIM") is SimMIM
    assert method_class("SimMIM") is SimMIM and method_class("MAE") is MAE
    assert method_class(f"{__name__}.PatchPooled") is PatchPooled
    for unknown in (None, "", "NoSuchMethod", "no_such_package.MAE", "advmim_pl.mim.methods.torch"):
        assert method_class(unknown) is None


@pytest.mark.parametrize("method", [SimMIM, "SimMIM", "advmim_pl.mim.methods.SimMIM", f"{__name__}.PatchPooled"])
def test_a_patch_pooling_method_gives_avg_whatever_the_caller_default(method):
    assert method_pooling(method, "token") == "avg" == method_pooling(method, "avg")


def test_a_token_method_or_an_unknown_one_gives_the_callers_default():
    assert SimMIM.pooling == "avg" and MAE.pooling == "token"
    assert method_pooling(MAE, "avg") == "token"  # declared: the method wins over the caller's default
    for unknown in (None, "NoSuchMethod", object()):
        assert method_pooling(unknown, "avg") == "avg" and method_pooling(unknown, "token") == "token"


def test_resolve_pooling_keeps_an_explicit_choice_and_warns_on_an_untrained_cls_token():
    assert resolve_pooling(None, "SimMIM", "token", "x.ckpt") == "avg"
    assert resolve_pooling(None, None, "token", "x.ckpt") == "token"
    with pytest.warns(UserWarning, match=r"'x.ckpt' was pre-trained with SimMIM.*global_pool: avg"):
        assert resolve_pooling("token", "SimMIM", "avg", "x.ckpt") == "token"
    with pytest.raises(ValueError, match="unknown pooling 'max': choose token, avg, or null"):
        resolve_pooling("max", "MAE", "token", "x.ckpt")
