"""The AEMIM plug-in, the generic attack engine it and the evaluation use, and the callback that puts an attack on
a trainer."""

from advmim_pl.adversarial.aemim import AEMIM
from advmim_pl.adversarial.attack import default_step_size, frozen_eval, perturb, pgd_attack, pgd_steps
from advmim_pl.adversarial.attacker import Attacker, AttackResult
from advmim_pl.adversarial.callback import AdversarialTargetCallback

__all__ = [
    "AEMIM",
    "AdversarialTargetCallback",
    "Attacker",
    "AttackResult",
    "default_step_size",
    "frozen_eval",
    "perturb",
    "pgd_attack",
    "pgd_steps",
]
