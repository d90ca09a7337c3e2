"""The AEMIM plug-in, the generic attack engine it and the evaluation use, and the callback that puts an attack on
a trainer."""

from advmim_pl.adversarial.aemim import AEMIM, PluginOutput, StepContext
from advmim_pl.adversarial.attack import default_step_size, frozen_eval, perturb, pgd_attack, pgd_steps
from advmim_pl.adversarial.attacker import Attacker, AttackResult, attacker_from
from advmim_pl.adversarial.callback import AdversarialTargetCallback

__all__ = [
    "AEMIM",
    "AdversarialTargetCallback",
    "Attacker",
    "AttackResult",
    "PluginOutput",
    "StepContext",
    "attacker_from",
    "default_step_size",
    "frozen_eval",
    "perturb",
    "pgd_attack",
    "pgd_steps",
]
