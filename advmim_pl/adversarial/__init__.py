"""The AEMIM attack engine and the callback that crafts adversarial targets during training."""

from advmim_pl.adversarial.attack import default_step_size, frozen_eval, perturb, pgd_attack, pgd_steps
from advmim_pl.adversarial.callback import AdversarialTargetCallback, AttackResult

__all__ = [
    "AdversarialTargetCallback",
    "AttackResult",
    "default_step_size",
    "frozen_eval",
    "perturb",
    "pgd_attack",
    "pgd_steps",
]
