"""The AEMIM attack engine, the plain Attacker that runs it, and the callback that puts it on a trainer."""

from advmim_pl.adversarial.attack import default_step_size, frozen_eval, perturb, pgd_attack, pgd_steps
from advmim_pl.adversarial.attacker import Attacker, AttackResult
from advmim_pl.adversarial.callback import AdversarialTargetCallback

__all__ = [
    "AdversarialTargetCallback",
    "Attacker",
    "AttackResult",
    "default_step_size",
    "frozen_eval",
    "perturb",
    "pgd_attack",
    "pgd_steps",
]
