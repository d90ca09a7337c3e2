"""An attack callback that records what it crafted, to compare runs and check the examples."""

import torch

from advmim_pl.adversarial import AdversarialTargetCallback


class RecordingAttack(AdversarialTargetCallback):
    """Keeps every crafted x_a (``crafted``), the autocast dtype the attack ran under (``autocast``), and per call
    (x, x_a, objective(x), objective(x_a)) (``calls``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crafted, self.autocast, self.calls = [], [], []

    def generate(self, pl_module, x, objective):
        device = x.device.type
        self.autocast.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        result = super().generate(pl_module, x, objective)
        self.crafted.append(result.x_adv.clone())
        with torch.no_grad():
            self.calls.append(
                (x.clone(), result.x_adv.clone(), objective(x).detach(), objective(result.x_adv).detach())
            )
        return result
