"""MaskedViT.forward_blocks: per-block outputs against timm's own forward_intermediates and a hand computation of the
feed-forward branch, on the whole image, the visible-only and the mask-token encodings, with checkpointing on."""

import pytest
import timm
import torch

from advmim_pl.mim.masking import random_masking
from advmim_pl.models.vit import MaskedViT, timm_kwargs
from tests.helpers.micro import MICRO_ENCODER, MICRO_VIT

LAYOUTS = {
    "cls": {},
    "cls_reg_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_prefix": dict(class_token=False, global_pool="avg"),
}
DEEP = {**MICRO_VIT, "depth": 3, "init_values": 0.5}  # 3 blocks with layer scale: ls2 is not the identity


def encoder(seed: int = 0, drop_path_rate: float = 0.0, **model_kwargs) -> MaskedViT:
    torch.manual_seed(seed)
    kwargs = {**MICRO_ENCODER, "model_kwargs": {**MICRO_VIT, **model_kwargs}}
    return MaskedViT(**kwargs, drop_path_rate=drop_path_rate)


def plain_timm(enc: MaskedViT, **model_kwargs) -> torch.nn.Module:
    """A fresh timm model of the same architecture holding ``enc``'s weights."""
    settings = dict(
        encoder=MICRO_ENCODER["name"],
        img_size=32,
        patch_size=4,
        in_chans=1,
        encoder_kwargs={**MICRO_VIT, **model_kwargs},
    )
    model = timm.create_model(**timm_kwargs(settings))
    model.load_state_dict(enc.vit.state_dict())
    return model.eval()


def timm_blocks(model, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """timm's block outputs (norm=False), prefix tokens put back in front: (B, P + N, D) each."""
    outs = model.forward_intermediates(
        x, indices=indices, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    if model.num_prefix_tokens == 0:
        return outs
    return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in outs]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("indices", [1, 2, [0], [-1, 0]])
def test_block_outputs_equal_timm_forward_intermediates(images, layout, indices):
    enc = encoder(**LAYOUTS[layout]).eval()
    reference_model = plain_timm(enc, **LAYOUTS[layout])
    x = images(batch=3)
    with torch.no_grad():
        ours = enc.forward_blocks(x, indices)
        reference = timm_blocks(reference_model, enc.normalize(x), indices)
    assert len(ours) == len(reference) == (indices if isinstance(indices, int) else len(indices))
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == (3, enc.num_prefix_tokens + enc.num_patches, 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the last block's output, through the final norm, is the usual encoding
    if indices in (1, 2, [-1, 0]):
        torch.testing.assert_close(enc.vit.norm(ours[-1]), enc.forward_features(x), atol=1e-5, rtol=0)


def test_ffn_outputs_equal_a_hand_computation_from_timm_blocks(images):
    """The feed-forward branch before the last residual, computed from timm's block outputs with timm's modules:
    h' = h + ls1(attn(norm1(h))), f = ls2(mlp(norm2(h'))), and h' + f is the block's output."""
    enc = encoder(**DEEP).eval()
    model = plain_timm(enc, **DEEP)
    x = images(batch=2)
    with torch.no_grad():
        ffn = enc.forward_blocks(x, [1, 2], tensor="ffn")
        outs = timm_blocks(model, enc.normalize(x), [0, 1, 2])
        for f, i in zip(ffn, (1, 2), strict=True):
            block, h = model.blocks[i], outs[i - 1]
            mid = h + block.ls1(block.attn(block.norm1(h)))
            expected = block.ls2(block.mlp(block.norm2(mid)))
            torch.testing.assert_close(f, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(mid + f, outs[i], atol=1e-5, rtol=0)
            assert (f - outs[i]).abs().max() > 1e-2  # a different tensor from the block output


def test_visible_only_blocks_equal_timm_blocks_on_the_kept_tokens(images):
    """Visible-only encoding: timm's patch embedding, positions and blocks applied by hand to the kept tokens."""
    enc = encoder(**DEEP).eval()
    model = plain_timm(enc, **DEEP)
    x = images(batch=3)
    keep, _ = random_masking(3, enc.num_patches, 0.75, x.device, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc.forward_blocks(x, 3, keep=keep)
        ffn = enc.forward_blocks(x, [0, 2], keep=keep, tensor="ffn")
        patches = model.patch_embed(enc.normalize(x)) + model.pos_embed[:, 1:]
        visible = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, 64))
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1)
        h = model.norm_pre(torch.cat([cls, visible], dim=1))
        inputs, expected = [], []
        for block in model.blocks:
            inputs.append(h)
            h = block(h)
            expected.append(h)
        torch.testing.assert_close(enc.vit.norm(ours[-1]), enc.forward_visible(x, keep), atol=1e-5, rtol=0)
        for f, i in zip(ffn, (0, 2), strict=True):
            block = model.blocks[i]
            mid = inputs[i] + block.ls1(block.attn(block.norm1(inputs[i])))
            torch.testing.assert_close(f, block.ls2(block.mlp(block.norm2(mid))), atol=1e-5, rtol=0)
    for a, b in zip(ours, expected, strict=True):
        assert a.shape == (3, 1 + 16, 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mask_token_blocks_end_in_forward_masked(images):
    enc = encoder().eval()
    x = images(batch=2)
    mask = torch.zeros(2, enc.num_patches)
    mask[:, ::3] = 1
    with torch.no_grad():
        (last,) = enc.forward_blocks(x, 1, mask=mask)
        (unmasked,) = enc.forward_blocks(x, 1)
        torch.testing.assert_close(enc.vit.norm(last), enc.forward_masked(x, mask), atol=1e-5, rtol=0)
    assert not torch.allclose(last, unmasked, atol=1e-3)


@pytest.mark.parametrize("tensor", ["block", "ffn"])
def test_checkpointed_blocks_give_the_same_outputs_and_gradients(images, tensor):
    """Training mode with stochastic depth: the recompute must draw the forward's masks; the feed-forward outputs
    read by the hook carry gradient through the checkpointed blocks."""
    x = images(batch=4)
    keep, _ = random_masking(4, 64, 0.5, x.device, torch.Generator().manual_seed(1))
    results = []
    for checkpointed in (False, True):
        enc = encoder(drop_path_rate=0.3, **DEEP)
        enc.vit.set_grad_checkpointing(checkpointed)
        enc.train()
        torch.manual_seed(5)
        outs = enc.forward_blocks(x, [0, 2], keep=keep, tensor=tensor)
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).square().mean() for o in outs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], grads))
    (plain_out, plain_grads), (ckpt_out, ckpt_grads) = results
    for a, b in zip(plain_out, ckpt_out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("blocks.0." in n for n in plain_grads) and any("blocks.2.mlp" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_blocks_after_the_last_chosen_one_are_not_run(images):
    enc = encoder(**DEEP).eval()
    calls = []
    for i, block in enumerate(enc.vit.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    with torch.no_grad():
        enc.forward_blocks(images(batch=1), [0, 1])
    assert calls == [0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(indices=0), r"indices 0: the number of last blocks must be in \[1, 2\]"),
        (dict(indices=3), r"indices 3"),
        (dict(indices=[2]), r"block index 2 is out of range for 2 blocks: use \[-2, 1\]"),
        (dict(indices=[]), "indices is empty"),
        (dict(indices=1, tensor="attn"), "tensor 'attn' is not one of"),
        (dict(indices=1, keep=torch.zeros(1, 4, dtype=torch.long), mask=torch.zeros(1, 64)), "not both"),
    ],
)
def test_bad_arguments_get_one_clear_line(images, kwargs, message):
    enc = encoder()
    with pytest.raises(ValueError, match=message):
        enc.forward_blocks(images(batch=1), **kwargs)
