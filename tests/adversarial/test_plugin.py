"""The AEMIM plug-in on a PretrainModule: the example is adversarial, the model is left untouched,
branch-specific norms separate the two losses, bad settings are refused."""

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.adversarial.attack import frozen_eval, pgd_attack, project, uniform_noise
from advmim_pl.mim.losses import feature_distance, upsample_mask
from advmim_pl.mim.methods import MAE, SimMIM
from advmim_pl.models.branch_norm import BranchNorm, branch
from advmim_pl.modules.pretrain import PretrainModule
from tests.helpers.micro import MICRO, smooth_images
from tests.helpers.micro import trainer as quiet_trainer

CPU = torch.device("cpu")


def make_method(name: str):
    if name == "mae":
        return MAE(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    return SimMIM(mask_ratio=0.5, mask_patch_size=8)


def make_module(
    method: str = "mae", init_seed: int = 0, drop_path_rate: float = 0.0, attack: dict | None = None, **plugin
) -> PretrainModule:
    """A micro PretrainModule, initialised from ``init_seed``, with the plug-in ``AEMIM(Attacker(**attack),
    **plugin)``."""
    torch.manual_seed(init_seed)
    options = {**MICRO, "base_lr": 0.05, "drop_path_rate": drop_path_rate}
    return PretrainModule(method=make_method(method), plugin=AEMIM(Attacker(**(attack or {})), **plugin), **options)


def set_attack(module: PretrainModule, attack: dict | None = None, **plugin) -> Attacker:
    """Give ``module`` the plug-in ``AEMIM(Attacker(**attack), **plugin)`` (view, distance), keeping its branch
    layout; returns its attack."""
    layout = {"branch_params": module.plugin.branch_params, "aux_decoder": module.plugin.aux_decoder}
    module.plugin = AEMIM(Attacker(**(attack or {})), **layout, **plugin)
    return module.plugin.attack


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Micro PretrainModule with the plug-in per method, trained a few optimizer steps with a Trainer."""
    cache = {}

    def get(method: str) -> PretrainModule:
        if method not in cache:
            module = make_module(method, attack=dict(eps=4 / 255, steps=1))
            data = TensorDataset(smooth_images(48, seed=1), torch.zeros(48, dtype=torch.long))
            trainer = quiet_trainer(6, default_root_dir=tmp_path_factory.mktemp(method))
            trainer.fit(module, DataLoader(data, batch_size=8))
            assert trainer.global_step == 6
            assert module.attack_callback in trainer.callbacks  # the module put its attack on the trainer
            assert torch.isfinite(trainer.callback_metrics["train/loss_aux"])
            assert trainer.callback_metrics["attack/delta_linf"].item() <= 4 / 255 + 1e-6
            cache[method] = module.eval()
        return cache[method]

    return get


def attack_score(module, x, mask, latent, perturbation, distance, attack_mask) -> float:
    """Mean feature distance (the module's objective) after one attack, scored on identical masks."""
    attacker = set_attack(
        module,
        attack=dict(eps=8 / 255, steps=3, perturbation=perturbation, seed=3),
        distance=distance,
        attack_mask=attack_mask,
    )
    objective = module.feature_objective(x, mask, latent)
    x_adv = attacker.generate(module, x, objective).x_adv
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    # `independent` draws a fresh mask per call from the attacker's generator: reseed it so that the
    # PGD and the noise examples are scored on the same masks, averaged over a few of them
    attacker.stream.generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return torch.stack([objective(x_adv).mean() for _ in range(4)]).mean().item()


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("attack_mask", ["none", "complement", "same", "independent"])
@pytest.mark.parametrize("distance", ["mse", "cosine", "kl"])
def test_pgd_example_is_more_adversarial_than_noise(trained, method, distance, attack_mask):
    module = trained(method)
    x = smooth_images(8, seed=7)
    mask = module.method.sample_mask(module.encoder, 8, CPU, torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = module.method.encode(module.encoder, x, mask)
    pgd = attack_score(module, x, mask, latent, "pgd", distance, attack_mask)
    noise = attack_score(module, x, mask, latent, "uniform", distance, attack_mask)
    assert pgd > 0 and noise > 0
    assert pgd > 2 * noise, (pgd, noise)  # observed >= 3.3x


def model_snapshot(module):
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    grads = {k: None if v.grad is None else v.grad.clone() for k, v in module.named_parameters()}
    modes = {k: m.training for k, m in module.named_modules()}
    return params, buffers, grads, modes


def assert_same_snapshot(a, b):
    for before, after in zip(a[:2], b[:2], strict=True):
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), key
    for key, grad in a[2].items():
        if grad is None:
            assert b[2][key] is None, key
        else:
            assert b[2][key] is not None and torch.equal(grad, b[2][key]), key
    assert a[3] == b[3]


def prepare_untouched_case(method):
    """Module in a mixed train/eval pattern with drop-path (which would draw from the global RNG in
    train mode), some grads set, a batch and its clean training-mode encoding."""
    module = make_module(method, drop_path_rate=0.2)
    module.train()
    module.decoder.eval()
    module.encoder.vit.blocks[0].eval()  # block 1 (drop-path rate 0.2) stays in train mode
    params = list(module.parameters())
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.grad = torch.randn_like(p)
    x = smooth_images(4, seed=2)
    mask = module.method.sample_mask(module.encoder, 4, CPU, torch.Generator().manual_seed(0))
    latent = module.method.encode(module.encoder, x, mask)  # with its own graph, as in training_step
    return module, x, mask, latent


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("attack_mask", ["none", "complement", "same", "independent"])
@pytest.mark.parametrize("perturbation", ["pgd", "sign", "gaussian", "uniform"])
def test_attack_leaves_model_grads_modes_and_rng_untouched(method, perturbation, attack_mask):
    module, x, mask, latent = prepare_untouched_case(method)
    attacker = set_attack(module, attack=dict(eps=8 / 255, steps=2, perturbation=perturbation), attack_mask=attack_mask)
    objective = module.feature_objective(x, mask, latent)
    before = model_snapshot(module)
    rng = torch.get_rng_state()
    result = attacker.generate(module, x, objective)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_snapshot(before, model_snapshot(module))
    assert bool(result.finite)
    assert 0 < result.delta_linf.item() <= 8 / 255 + 1e-6
    assert not result.x_adv.requires_grad


@pytest.mark.parametrize("attack_mask", ["none", "complement", "same", "independent"])
def test_objective_and_attack_together_leave_rng_untouched(attack_mask):
    module, x, mask, latent = prepare_untouched_case("mae")
    attacker = set_attack(module, attack=dict(eps=8 / 255, steps=2), attack_mask=attack_mask)
    rng = torch.get_rng_state()
    before = model_snapshot(module)
    attacker.generate(module, x, module.feature_objective(x, mask, latent))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_snapshot(before, model_snapshot(module))


@pytest.mark.parametrize("attack_mask", ["none", "complement", "same", "independent"])
def test_attack_is_reproducible_from_its_seed(attack_mask):
    module, x, mask, latent = prepare_untouched_case("simmim")
    module.eval()
    outputs = []
    for _ in range(2):
        attacker = set_attack(module, attack=dict(eps=8 / 255, steps=2, seed=11), attack_mask=attack_mask)
        outputs.append(attacker.generate(module, x, module.feature_objective(x, mask, latent)).x_adv)
    assert torch.equal(outputs[0], outputs[1])


def branch_losses(module):
    """(L_clean, L_aux) of one step, written out by hand from the method's parts (no trainer)."""
    method, encoder = module.method, module.encoder
    attacker = set_attack(module, attack=dict(eps=8 / 255, steps=1))
    x = smooth_images(4, seed=3)
    mask = method.sample_mask(encoder, 4, CPU, torch.Generator().manual_seed(1))
    latent = method.encode(encoder, x, mask)
    clean, aux = module.host(), module.host(aux=True)
    loss_clean = clean.loss(clean.decode(latent, mask), clean.targets(x), mask)
    result = attacker.generate(module, x, module.feature_objective(x, mask, latent))
    with branch(encoder, "aux"):
        latent_aux = method.encode(encoder, result.x_adv, mask)
    loss_aux = aux.loss(aux.decode(latent_aux, mask), aux.targets(result.x_adv), mask)
    return loss_clean, loss_aux


def grads_of(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()}


def nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_branch_norms_separate_the_losses(method):
    module = make_module(method, branch_params="norm").train()
    assert any(isinstance(m, BranchNorm) for m in module.encoder.modules())
    loss_clean, loss_aux = branch_losses(module)
    aux_names = [k for k, _ in module.named_parameters() if ".aux." in k]
    clean_norm_names = [k for k, _ in module.named_parameters() if ".clean." in k]
    assert aux_names and len(aux_names) == len(clean_norm_names)

    g_aux = grads_of(module, loss_aux)
    assert any(nonzero(g_aux[k]) for k in aux_names)
    assert not any(nonzero(g_aux[k]) for k in clean_norm_names)
    assert not any(nonzero(g) for k, g in g_aux.items() if k.startswith("decoder."))
    assert any(nonzero(g) for k, g in g_aux.items() if k.startswith("aux_decoder."))

    g_clean = grads_of(module, loss_clean)
    assert not any(nonzero(g_clean[k]) for k in aux_names)
    assert any(nonzero(g_clean[k]) for k in clean_norm_names)
    assert not any(nonzero(g) for k, g in g_clean.items() if k.startswith("aux_decoder."))
    # the shared encoder weights get gradient from both
    shared = "encoder.vit.blocks.0.attn.qkv.weight"
    assert nonzero(g_aux[shared]) and nonzero(g_clean[shared])


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_shared_encoder_without_branch_params(method):
    module = make_module(method, branch_params="none").train()
    assert not any(isinstance(m, BranchNorm) for m in module.modules())
    assert not any(".aux." in k or ".clean." in k for k in module.state_dict())
    loss_clean, loss_aux = branch_losses(module)
    norm_params = [
        f"encoder.{name}.{p}"
        for name, m in module.encoder.named_modules()
        if isinstance(m, torch.nn.LayerNorm)
        for p in ("weight", "bias")
    ]
    g_aux, g_clean = grads_of(module, loss_aux), grads_of(module, loss_clean)
    reached_aux = {k for k in norm_params if nonzero(g_aux[k])}
    reached_clean = {k for k in norm_params if nonzero(g_clean[k])}
    assert reached_aux and reached_aux == reached_clean


def test_shared_aux_decoder():
    module = make_module("mae", aux_decoder="shared")
    assert module.aux_decoder is None and module.host(aux=True).decoder is module.decoder


@pytest.mark.parametrize(
    "owner, kwargs, message",
    [
        (Attacker, dict(eps=-1), "eps must be a non-negative L-inf budget in pixel units, got -1"),
        (Attacker, dict(steps=-1), "steps must be non-negative, got -1"),
        (AEMIM, dict(distance="l3"), "distance must be one of ('mse', 'cosine', 'kl'), got 'l3'"),
        (
            Attacker,
            dict(perturbation="salt"),
            "perturbation must be one of ('pgd', 'sign', 'gaussian', 'uniform', 'none'), got 'salt'",
        ),
        (
            AEMIM,
            dict(attack_mask="random"),
            "attack_mask must be one of ('none', 'complement', 'same', 'independent'), got 'random'",
        ),
        (Attacker, dict(step_size=0.0), "step_size must be positive, or null for the default, got 0.0"),
        (Attacker, dict(steps=0), "steps must be at least 1 with perturbation: pgd, got 0"),
        (Attacker, dict(warmup_epochs=-0.5), "warmup_epochs must be non-negative, got -0.5"),
        (AEMIM, dict(aux_weight=-1.0), "aux_weight must be non-negative, got -1.0"),
        (AEMIM, dict(batch_fraction=1.5), "batch_fraction must be in (0, 1], got 1.5"),
        (MAE, dict(aux_target_norm="batch"), "aux_target_norm must be one of ('floor', 'clean', 'patch'), got 'batch'"),
    ],
)
def test_bad_settings_are_refused_in_one_line_by_the_class_that_owns_them(owner, kwargs, message):
    with pytest.raises(ValueError) as err:
        owner(**kwargs)
    assert str(err.value) == message


def test_the_attack_engine_knows_no_masks_or_distances():
    """The generic engine refuses the plug-in's MIM options: they belong to AEMIM."""
    for option in ("attack_mask", "distance"):
        with pytest.raises(TypeError, match=option):
            Attacker(**{option: "none"})


def test_zero_steps_allowed_for_noise_controls():
    assert AEMIM(attack=Attacker(steps=0, perturbation="gaussian")).attack.steps == 0


# ---- where the adversarial pixels land ----------------------------------------------------------------------
def moved_by_pgd(module, method: str, attack_mask: str) -> float:
    """Fraction of the pixels the auxiliary loss scores (the step's masked patches) whose value in x_a differs
    from the random start, i.e. that the PGD step itself moved."""
    x = smooth_images(8, seed=7)
    mask = module.method.sample_mask(module.encoder, 8, CPU, torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = module.method.encode(module.encoder, x, mask)
    attacker = set_attack(module, attack=dict(eps=4 / 255, seed=3), attack_mask=attack_mask)
    x_adv = attacker.generate(module, x, module.feature_objective(x, mask, latent)).x_adv
    start = project(x + uniform_noise(x, 4 / 255, torch.Generator().manual_seed(3)), x, 4 / 255)
    scored = upsample_mask(mask.patches, module.encoder.grid_size, module.encoder.patch_size).expand_as(x).bool()
    return ((x_adv - start).abs() > 1e-7)[scored].float().mean().item()


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_the_default_attack_moves_the_scored_pixels(trained, method):
    """The default view (the whole image) puts the adversarial step on the pixels the auxiliary loss scores."""
    assert moved_by_pgd(trained(method), method, AEMIM().attack_mask) >= 0.9


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("attack_mask, low, high", [("none", 0.9, 1.0), ("complement", 0.9, 1.0), ("same", 0.0, 0.0)])
def test_fraction_of_scored_pixels_moved_by_pgd(trained, method, attack_mask, low, high):
    """``same`` hides the scored patches from the attacked encoder (MAE drops them, SimMIM swaps in the mask
    token), so their input gradient is exactly zero and they carry only the random start: recorded here."""
    assert low <= moved_by_pgd(trained(method), method, attack_mask) <= high


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_complement_view_shows_exactly_the_hidden_patches(method):
    module = make_module(method)
    mask = module.method.sample_mask(module.encoder, 6, CPU, torch.Generator().manual_seed(2))
    view = module.method.complement(module.encoder, mask)
    torch.testing.assert_close(view.patches, 1 - mask.patches)
    if method == "mae":
        hidden = mask.patches.bool()
        assert view.keep.shape[1] == int(hidden[0].sum())
        assert all(set(view.keep[i].tolist()) == set(hidden[i].nonzero().flatten().tolist()) for i in range(6))


def objective_rise(module, x, mask, latent, attack_mask: str, perturbation: str) -> float:
    """Mean rise of the attack objective from x to the example (default budget, one step), scored on the
    view the attack saw (``independent`` draws it from the generator: the same seed draws it again)."""
    attacker = set_attack(module, attack=dict(perturbation=perturbation, seed=3), attack_mask=attack_mask)

    def objective():
        return module.feature_objective(x, mask, latent, torch.Generator().manual_seed(9))

    x_adv = attacker.generate(module, x, objective()).x_adv
    with torch.no_grad():
        rise = objective()(x_adv) - objective()(x)
    return rise.mean().item()


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("attack_mask", ["none", "complement", "same", "independent"])
def test_pgd_raises_the_objective_more_than_an_energy_matched_random_sign(trained, method, attack_mask):
    module = trained(method)
    x = smooth_images(8, seed=7)
    mask = module.method.sample_mask(module.encoder, 8, CPU, torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = module.method.encode(module.encoder, x, mask)
    pgd = objective_rise(module, x, mask, latent, attack_mask, "pgd")
    sign = objective_rise(module, x, mask, latent, attack_mask, "sign")
    assert pgd > 0 and pgd > 1.5 * max(sign, 0.0), (pgd, sign)


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("attack_mask", ["same", "complement"])
def test_drop_path_target_is_the_eval_mode_encoding(method, attack_mask):
    """With stochastic depth in training mode the target is still a pass without it: x_a equals the example
    crafted by hand from an eval-mode target with the same random start."""
    module = make_module(method, drop_path_rate=0.1).train()
    x = smooth_images(4, seed=2)
    mask = module.method.sample_mask(module.encoder, 4, CPU, torch.Generator().manual_seed(0))
    latent = module.method.encode(module.encoder, x, mask)  # training mode: drop-path active
    attacker = set_attack(module, attack=dict(seed=5), attack_mask=attack_mask)
    x_adv = attacker.generate(module, x, module.feature_objective(x, mask, latent)).x_adv

    method_, encoder = module.method, module.encoder
    view = mask if attack_mask == "same" else method_.complement(encoder, mask)
    with torch.no_grad(), frozen_eval(module):
        target = method_.encode(encoder, x, view)

    def by_hand(x_adv):
        with branch(encoder, "aux"):
            return feature_distance(method_.encode(encoder, x_adv, view), target, "mse")

    with frozen_eval(module):
        expected = pgd_attack(by_hand, x, 4 / 255, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x_adv, expected)
    if attack_mask == "same":  # the step's own latent was made with drop-path: it differs from the target
        assert not torch.allclose(latent, target)


# ---- settings that cannot work, and the random stream ---------------------------------------------------
def fit(module, tmp_path, max_epochs=1, **trainer_kwargs):
    data = TensorDataset(smooth_images(32, seed=1), torch.zeros(32, dtype=torch.long))
    trainer = quiet_trainer(max_epochs=max_epochs, default_root_dir=tmp_path, **trainer_kwargs)
    val = DataLoader(TensorDataset(smooth_images(16, seed=4), torch.zeros(16, dtype=torch.long)), batch_size=8)
    trainer.fit(module, DataLoader(data, batch_size=8), val)
    return trainer


def test_no_random_start_with_a_fully_shared_encoder_is_refused():
    with pytest.raises(ValueError, match=r"branch_params must be norm with random_start: false .*, got 'none'"):
        AEMIM(attack=Attacker(random_start=False), branch_params="none")


def test_no_random_start_with_branch_norms_warns_that_the_first_step_is_zero():
    with pytest.warns(UserWarning, match="random_start=False.*identical"):
        AEMIM(attack=Attacker(random_start=False))


@pytest.mark.parametrize("kwargs, words", [(dict(eps=2.0), "did you mean 2/255"), (dict(eps=0.0), "pgd")])
def test_impossible_budgets_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Attacker(**kwargs)


def test_a_large_budget_warns():
    with pytest.warns(UserWarning, match="eps=0.2"):
        AEMIM(attack=Attacker(eps=0.2))


def test_training_stream_ignores_logging_and_validation_settings(tmp_path):
    """Logging evaluates the objective (drawing masks and a random sign) and validation crafts its own
    targets: neither may shift the masks or the attack draws of training."""
    weights = []
    for log_every, val_every in ((1, 1), (3, 2)):
        torch.manual_seed(0)
        module = make_module("mae", attack=dict(seed=1), attack_mask="independent", on_validation=True)
        fit(
            module,
            tmp_path / f"{log_every}-{val_every}",
            max_epochs=2,
            log_every_n_steps=log_every,
            check_val_every_n_epoch=val_every,
            logger=CSVLogger(tmp_path / f"logs-{log_every}-{val_every}"),
        )
        weights.append(module.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_the_objective_gain_over_random_is_logged(trained):
    module = trained("mae")
    metrics = module.trainer.callback_metrics
    gain, adv, rnd = (metrics[f"attack/{k}"].item() for k in ("gain_over_random", "objective_adv", "objective_random"))
    assert gain == pytest.approx(adv - rnd, abs=1e-6)
    assert gain > 0
