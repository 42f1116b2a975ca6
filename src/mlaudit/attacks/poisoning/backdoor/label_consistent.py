"""Label-consistent backdoor (Turner, Tsipras & Madry 2019, "Label-Consistent Backdoor Attacks"): a
clean-label backdoor. Only rows of the *target* class are poisoned and their labels are kept, so
every poison looks correctly labelled. Stamping a trigger on ordinary target-class images teaches
little (the victim classifies them by their content already), so each poison is first made hard to
classify: an adversarial perturbation within an l-inf ball of radius eps that maximises a fixed
crafting model's loss on the true label (the untargeted objective of adversarial poisoning,
:class:`~mlaudit.attacks.poisoning.availability.AdversarialLoss`), crafted through the one crafting
engine (:func:`mlaudit.craft.craft`, PGD by default). The trigger is stamped afterwards; the victim
then leans on the trigger to fit these hard images, and at test time the trigger alone pulls inputs
of other classes to the target.

Budget: outside the trigger's pixels each poison differs from its clean image by at most eps (and
stays in [0, 1]); the trigger's own pixels are *outside* the eps budget, as in the paper (Turner et
al. bound the adversarial perturbation, not the pattern; a reduced-amplitude trigger, ``alpha`` < 1,
and the four-corner trigger, ``location: four-corners``, are their variants for stealth and for
horizontal flips). The view therefore holds the exact difference with ``eps=None``.

Turner et al. also make images hard by GAN interpolation and craft against adversarially trained
models; the second is a crafting recipe here (``crafting.recipe`` with ``adversarial``).
"""

from __future__ import annotations

from ....craft import LinfBall, craft
from ....query import evaluating
from ..availability.adversarial import AdversarialLoss, crafter_predictions
from ..availability.base import AVAILABILITY_CRAFTING, check_inputs
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .base import BackdoorOptions, check_classes, choose_rows, stamped, trigger_of

LABEL_CONSISTENT_CRAFTING = AVAILABILITY_CRAFTING
"""The crafting defaults: those of adversarial poisoning (250 PGD steps of 2.5 eps / steps, constant
step size, one restart, the victims' augmentation applied differentiably)."""


@register_poisoner("label-consistent", family="backdoor", needs=Needs.CRAFTING_MODELS, options=BackdoorOptions,
                   defaults=LABEL_CONSISTENT_CRAFTING, check_data=check_classes)
def label_consistent(task: PoisonTask) -> Poison:
    """Label-consistent backdoor (Turner et al. 2019): target-class rows made hard within eps, then triggered; labels kept."""
    opts: BackdoorOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    s = task.crafting_settings
    trigger = trigger_of(task, opts)
    ids = choose_rows(task, [opts.target_class], opts.budget, what="target-class")
    x, y = task.train.x[ids].to(task.device), task.train.y[ids].to(task.device)
    check_inputs(x, y, task.num_classes)
    models = list(task.models)
    with evaluating(*models, requires_grad=False):  # gradients reach the perturbations only
        res = craft(AdversarialLoss(models, y, targeted=False), x, constraint=LinfBall(task.linf_eps()), steps=s.steps,
                    optimizer=s.optimizer, lr=s.lr, schedule=s.schedule, restarts=s.restarts, init="zero",
                    augment=task.crafting_augment, batch_size=s.batch_size, generator=task.generator(),
                    on_step=task.on_step)
    hard = x + res.delta
    bs = s.batch_size or 1024
    before = crafter_predictions(models, x, batch_size=bs)
    after = crafter_predictions(models, hard, batch_size=bs)
    info = {"eps": task.linf_eps(), "objective_mean": res.objective / max(len(ids), 1),
            "crafter_accuracy_clean": float((before == y).float().mean()),
            "crafter_accuracy_perturbed": float((after == y).float().mean()),
            "max_abs_perturbation": float(res.delta.abs().max()) if res.delta.numel() else 0.0}
    return stamped(task, ids, hard.detach().to(task.train.device), trigger, opts, relabel=False, info=info)

