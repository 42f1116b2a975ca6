"""Config of the ``federated`` kind and the checks that need the loaded data (runner hook).

    kind: federated
    dataset: digits
    model: mlp                       # zoo name or package.module:factory (the global model)
    recipe: fast                     # used only with pretrain: true
    attack: imprint                  # imprint | inverting-gradients | dlg | decepticons (text: below)
    users: 8
    batch: 8                         # inputs per user in the round
    protocol: fedsgd                 # fedsgd | fedavg (local_epochs, local_batch, local_lr)
    partition: {scheme: iid}         # iid | by-class (classes_per_user) | dirichlet (alpha)
    aggregation: {secure: true, clip: null, noise_multiplier: 0}
    imprint: {bins: 64, measurement: brightness, cdf: empirical}   # variant: module | parameters (layer, next_layer)
    inversion: {steps: 1000, lr: 0.1, tv: 1.0e-4, restarts: 1, labels: recovered}
    psnr_threshold: 30
    defence: {method: none}          # none | noise (sigma) | clip-noise (clip, sigma) | prune (prune) | quantise (bits)
    transport: simulated             # simulated | flower (the rounds over gRPC: ImprintStrategy or CuriousStrategy)
    rounds: 1                        # several rounds (fresh batches; imprint: bins re-planted; inversion: FedAvg trains)
    attack_rounds: null              # inversion attacks over several rounds: the rounds attacked (null: every round)
    flower_host: 127.0.0.1           # with transport: flower; a non-loopback host needs allow_remote: true

Decepticons on text (Fowl et al. 2022, "Decepticons"; malicious parameters in a GPT-style model):

    dataset: {name: pydoc-text, options: {length: 32}}
    model: {name: "mlaudit.models.gpt:tiny_gpt", kwargs: {d_model: 128}}   # or your factory of a TinyGPT
    attack: decepticons
    users: 8                         # sequences come from users x batch
    batch: 1
    decepticons: {bins: null, tag_tokens: 2, user_counts: [1, 2, 4, 8], samples: 4}
    text_inversion: {run: true, steps: 300, refine: 200}   # the honest-but-curious inversion next to it

The honest-but-curious text inversion on its own, on any causal language model (TAG / LAMP style):

    dataset: {name: pydoc-text, options: {length: 32}}
    model: "yourpkg.lm:build"         # forward(tokens [B, L]) -> logits [B, V, L], through an nn.Embedding
    attack: text-inversion
    text_inversion: {steps: 300, refine: 200, user_counts: [1, 2, 4], embedding: null, samples: 4}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ..craft.constraints import box_width
from ..data.base import DataBundle
from ..errors import ConfigError
from .base import ExperimentConfig, Stream

ATTACKS = ("inverting-gradients", "dlg", "imprint", "decepticons", "text-inversion")
TEXT_ATTACKS = ("decepticons", "text-inversion")
"""The attacks on token sequences through a language model (:mod:`.federated_text`)."""
TINY_GPT = "mlaudit.models.gpt:tiny_gpt"
"""The import string of mlaudit's own TinyGPT factory (the zoo holds classifiers only)."""


class PartitionOptions(BaseModel):
    """How the training split is shared among users (:func:`mlaudit.federated.partition`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["iid", "by-class", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0.0, le=1e6)
    classes_per_user: int = Field(2, ge=1, le=10_000)


class AggregationOptions(BaseModel):
    """``secure``: the server sees only the sum of the users' updates (else each update alone); ``clip``
    each user's update to this l2 norm; ``noise_multiplier``: Gaussian noise of std noise_multiplier * clip
    on the sum (:func:`mlaudit.federated.secure_aggregate`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secure: bool = True
    clip: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    noise_multiplier: float = Field(0.0, ge=0.0, le=1e6)

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> AggregationOptions:
        if self.noise_multiplier > 0 and self.clip is None:
            raise ValueError(f"aggregation.noise_multiplier = {self.noise_multiplier} needs aggregation.clip (the noise "
                             "std is noise_multiplier * clip); allowed: set clip > 0, or noise_multiplier 0")
        return self


class ImprintOptions(BaseModel):
    """The malicious server's imprint: ``variant`` ``module`` (an imprint module in front of the model,
    :func:`mlaudit.attacks.federated.plant_imprint`) or ``parameters`` (no architecture change: the bins in
    rows of the model's own first Linear, :func:`mlaudit.attacks.federated.plant_imprint_parameters`, which
    ``layer`` and ``next_layer`` may name; None: the first Linear and the next)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bins: int = Field(64, ge=1, le=65_536)
    measurement: Literal["brightness", "random"] = "brightness"
    cdf: Literal["empirical", "gaussian"] = "empirical"
    feedback: float = Field(1e-2, gt=0.0, le=1e3)
    scale: float | None = Field(None, gt=0.0, le=1e6)
    """Multiplies the imprint weights and offsets (same bins; see plant_imprint). None: 1e-3 with
    ``transport: flower`` (float32 weights on the wire), else 1."""
    variant: Literal["module", "parameters"] = "module"
    layer: str | None = Field(None, min_length=1, max_length=300)
    next_layer: str | None = Field(None, min_length=1, max_length=300)

    @model_validator(mode="after")
    def _layers_need_parameters(self) -> ImprintOptions:
        named = [f"imprint.{k} = {getattr(self, k)!r}" for k in ("layer", "next_layer") if getattr(self, k) is not None]
        if named and self.variant != "parameters":
            raise ValueError(f"{', '.join(named)} names a layer of imprint.variant = 'parameters' (the bins in the model's "
                             f"own first Linear); with imprint.variant = {self.variant!r} the imprint is an extra module: "
                             "drop it, or set imprint.variant: parameters")
        return self


class InversionOptions(BaseModel):
    """The honest-but-curious optimisation (inverting-gradients, dlg): crafting-engine steps, step size
    in pixel units, TV weight (inverting-gradients), restarts; ``labels``: ``known`` (given to the
    attack) or ``recovered`` from the last layer (dlg with ``soft_labels`` optimises them instead)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1000, ge=1, le=1_000_000)
    lr: float = Field(0.1, gt=0.0, le=1e3)
    tv: float = Field(1e-4, ge=0.0, le=1e6)
    restarts: int = Field(1, ge=1, le=64)
    labels: Literal["known", "recovered"] = "recovered"
    soft_labels: bool = True


class LpipsOptions(BaseModel):
    """LPIPS of the matched reconstructions (:func:`mlaudit.attacks.federated.lpips_alexnet`; Zhang et al. 2018),
    from two files the user has on disk (nothing is downloaded): ``backbone`` a torchvision AlexNet state_dict,
    ``lin`` LPIPS v0.1's linear layers (the ``lpips`` package's ``weights/v0.1/alex.pth``), each checked against
    its sha256 when given. ``threshold``: an input counts as perceptually recovered when LPIPS <= it. Image
    attacks only; sides of at least 31 pixels (AlexNet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str
    lin: str
    backbone_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    lin_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    threshold: float = Field(0.1, gt=0.0, le=10.0)


class DefenceOptions(BaseModel):
    """A client-side defence on each user's update before the server sees it
    (:func:`mlaudit.federated.defend_updates`; Zhu et al. 2019, "Deep Leakage from Gradients", section 5):
    ``noise`` adds N(0, sigma^2) per entry; ``clip-noise`` clips the user's whole update to l2 norm ``clip``
    then adds N(0, (sigma clip)^2) (per-client update, not per-example DP-SGD); ``prune`` zeroes the
    fraction ``prune`` of smallest-magnitude entries per tensor; ``quantise`` rounds to ``bits`` bits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "noise", "clip-noise", "prune", "quantise"] = "none"
    sigma: float | None = Field(None, ge=0.0, le=1e6, allow_inf_nan=False)
    clip: float | None = Field(None, gt=0.0, le=1e9, allow_inf_nan=False)
    prune: float | None = Field(None, ge=0.0, lt=1.0)
    bits: int | None = Field(None, ge=2, le=32)

    @model_validator(mode="after")
    def _fields_of_method(self) -> DefenceOptions:
        needs = {"none": (), "noise": ("sigma",), "clip-noise": ("clip", "sigma"), "prune": ("prune",),
                 "quantise": ("bits",)}[self.method]
        for name in ("sigma", "clip", "prune", "bits"):
            value = getattr(self, name)
            if name in needs and value is None:
                raise ValueError(f"defence.{name} is required with defence.method = {self.method!r}; allowed: "
                                 + {"sigma": "sigma >= 0", "clip": "clip > 0", "prune": "0 <= prune < 1",
                                    "bits": "2 <= bits <= 32"}[name])
            if name not in needs and value is not None:
                raise ValueError(f"defence.{name} = {value} does not apply to defence.method = {self.method!r}; "
                                 f"allowed fields with it: {', '.join(('method', *needs))}")
        return self


class DecepticonsOptions(BaseModel):
    """The malicious server's parameters in a TinyGPT (:func:`mlaudit.attacks.federated.plant_decepticon`;
    Fowl et al. 2022, "Decepticons"): ``bins`` of the first MLP layer (None: all of it, 4 x d_model), the
    first attention layer's sequence ``tag`` of the first ``tag_tokens`` tokens, the bins' ``scale`` (None:
    1 for ReLU, steep for GELU), the ``feedback`` strength, and the decoding tolerance ``tol``.
    ``user_counts``: the numbers of users whose summed update the server attacks (the first n users of the
    round, nested; None: ``users`` alone). ``samples``: recovered vs true sequences shown in the reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bins: int | None = Field(None, ge=1, le=65_536)
    tag: bool = True
    tag_tokens: int = Field(1, ge=1, le=64)
    scale: float | None = Field(None, gt=0.0, le=1e6)
    feedback: float = Field(1e-2, gt=0.0, le=1e3)
    tol: float = Field(0.05, gt=0.0, lt=1.0)
    user_counts: tuple[int, ...] | None = Field(None, min_length=1, max_length=64)
    samples: int = Field(4, ge=0, le=64)


class TextInversionOptions(BaseModel):
    """The honest-but-curious text inversion (:func:`mlaudit.attacks.federated.text_inversion`; TAG / LAMP style)
    on the unmodified model's aggregate: next to Decepticons on the same users (``run``), or the attack itself
    (``attack: text-inversion``, any causal language model; ``run`` is then implied). Crafting-engine ``steps`` of
    ``lr`` (embedding-std units), ``restarts``, the gradient ``distance`` (``l1``: the l1 weight of ``l2+l1``,
    TAG's; None: 0.01), the soft labels' ``temperature``, ``refine`` discrete moves, the ``candidates`` of the
    inputs: the ``bag`` of tokens read off the update (every token with tied embeddings) or the whole
    ``vocabulary``, ``embedding_reg``, LAMP's embedding-length regulariser of the continuous phase (0: off), and
    ``match_embedding``: match the token embedding's gradient too, through soft token weights. ``embedding``: the
    module name of the token embedding in a model with several ``nn.Embedding`` and no ``get_input_embeddings()``
    (None: found as the attack's docstring says). With ``attack: text-inversion``: ``user_counts``, the numbers of
    users whose update the server inverts (the first n of the round; None: ``users`` alone), and ``samples``, true
    sequences shown next to their closest recovered one in the reports (with Decepticons its ``user_counts`` and
    ``samples`` apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: bool | None = None
    """Run the inversion next to Decepticons (None: no; with ``attack: text-inversion`` it always runs, and
    ``false`` is refused)."""
    steps: int = Field(300, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0.0, le=1e3)
    distance: Literal["cosine", "l2", "l2+l1"] = "cosine"
    l1: float | None = Field(None, ge=0.0, le=1e6)
    restarts: int = Field(1, ge=1, le=64)
    temperature: float = Field(0.05, gt=0.0, le=100.0)
    refine: int = Field(200, ge=0, le=1_000_000)
    candidates: Literal["bag", "vocabulary"] = "bag"
    embedding_reg: float = Field(0.0, ge=0.0, le=1e6)
    match_embedding: bool = False
    embedding: str | None = Field(None, min_length=1, max_length=300)
    user_counts: tuple[int, ...] | None = Field(None, min_length=1, max_length=64)
    samples: int = Field(4, ge=0, le=64)

    @model_validator(mode="after")
    def _l1_needs_l2_l1(self) -> TextInversionOptions:
        if self.l1 is not None and self.distance != "l2+l1":
            raise ValueError(f"text_inversion.l1 = {self.l1} weighs the l1 term of text_inversion.distance = 'l2+l1'; "
                             f"with distance = {self.distance!r} it does nothing: drop it, or set distance: l2+l1")
        return self


class FederatedConfig(ExperimentConfig):
    """See the module docstring and docs/federated.md for every field."""

    kind: Literal["federated"] = "federated"
    attack: Literal["inverting-gradients", "dlg", "imprint", "decepticons", "text-inversion"] = "imprint"
    users: int = Field(8, ge=1, le=100_000)
    batch: int = Field(8, ge=1, le=65_536)
    """Inputs per user in the round (FedSGD: one gradient on them; FedAvg: the user's local data)."""
    protocol: Literal["fedsgd", "fedavg"] = "fedsgd"
    local_epochs: int = Field(1, ge=1, le=1000)
    local_batch: int | None = Field(None, ge=1, le=65_536)
    local_lr: float = Field(0.1, gt=0.0, le=1e3)
    user_mode: Literal["eval", "train"] = "eval"
    partition: PartitionOptions = PartitionOptions()
    aggregation: AggregationOptions = AggregationOptions()
    imprint: ImprintOptions = ImprintOptions()
    inversion: InversionOptions = InversionOptions()
    decepticons: DecepticonsOptions = DecepticonsOptions()
    """``attack: decepticons`` (token data and a TinyGPT): see :class:`DecepticonsOptions`."""
    text_inversion: TextInversionOptions = TextInversionOptions()
    """``attack: text-inversion``, or with ``attack: decepticons`` (``run: true``) on the same round: the
    honest-but-curious text inversion (see :class:`TextInversionOptions`)."""
    lpips: LpipsOptions | None = None
    """LPIPS of each matched reconstruction next to PSNR and SSIM (None: not computed); see :class:`LpipsOptions`."""
    defence: DefenceOptions = DefenceOptions()
    """Client-side defence on each update before the server sees it; the attack also runs without it."""
    pretrain: bool = False
    """Train the global model under ``recipe`` first (one per trial); else attack it at its initialisation."""
    trials: int = Field(1, ge=1, le=1000)
    psnr_threshold: float = Field(30.0, gt=0.0, le=1000.0)
    box: tuple[float, float] = (0.0, 1.0)
    grid: int = Field(16, ge=0, le=64)
    """Inputs shown (true above recovered) in the report's grid; 0: none."""
    chunk: int | None = Field(None, ge=1, le=100_000)
    """Users per vmap call of the FedSGD gradients (None: all at once)."""
    transport: Literal["simulated", "flower"] = "simulated"
    """``flower``: the rounds run through Flower over gRPC on ``flower_host`` (needs the ``flower`` extra), one
    TorchClient per user, float32 weights on the wire. ``attack: imprint``: a malicious ImprintStrategy reading
    the FedAvg aggregate (secure aggregation) or each client's update (without), FedSGD or FedAvg, client defences.
    ``inverting-gradients``/``dlg``: an honest-but-curious CuriousStrategy (the aggregate under secure
    aggregation, else each client's update), FedSGD or FedAvg, client defences. ``decepticons``: per user count
    two Flower runs (the planted and the unmodified TinyGPT as parameter values), ReLU models only. Server-side
    ``aggregation.clip`` / ``noise_multiplier`` run in the strategy's aggregate step (TrustedAggregator)."""
    rounds: int = Field(1, ge=1, le=1000)
    """Rounds (one trial). Each round every user draws ``batch`` of its partition share. Imprint (simulated or
    Flower): the server re-plants its bins each round (``metrics.imprint.rounds``: per round, and the fraction
    of the users' shares recovered verbatim at least once); a client defence acts on each round's update, each user's
    noise stream continuing from round to round. Inverting Gradients / DLG (simulated or
    Flower): FedAvg (or FedSGD) trains the global model round by round, the server attacks the rounds in
    ``attack_rounds`` (``metrics.training``: the global model's test accuracy after each round, the wall time
    per round, each attacked round's recovery)."""
    attack_rounds: tuple[int, ...] | None = Field(None, min_length=1, max_length=1000)
    """With ``inverting-gradients`` or ``dlg``: the rounds the server inverts (None: every round)."""
    flower_host: str = "127.0.0.1"
    allow_remote: bool = False
    """Let ``flower_host`` be a non-loopback address (the malicious server then listens on a network)."""

    @model_validator(mode="after")
    def _fits(self) -> FederatedConfig:
        box_width(self.box, where="box")
        if self.local_batch is not None and self.local_batch > self.batch:
            raise ValueError(f"local_batch = {self.local_batch} exceeds batch = {self.batch} (each user's local data); "
                             f"allowed 1 <= local_batch <= {self.batch}")
        if self.transport == "flower":
            self._flower_fits()
        if self.rounds > 1:
            self._rounds_fit()
        if self.attack_rounds is not None:
            wrong = [r for r in self.attack_rounds if not 1 <= r <= self.rounds]
            if self.attack not in ("inverting-gradients", "dlg"):
                raise ValueError(f"attack_rounds = {list(self.attack_rounds)} chooses the rounds an inversion attack "
                                 f"runs on; with attack = {self.attack!r} it does not apply (allowed: attack "
                                 "inverting-gradients or dlg, or drop attack_rounds)")
            if wrong or len(set(self.attack_rounds)) != len(self.attack_rounds):
                raise ValueError(f"attack_rounds = {list(self.attack_rounds)}: allowed distinct rounds r with "
                                 f"1 <= r <= rounds = {self.rounds}")
        if self.protocol == "fedsgd" and (self.local_epochs != 1 or self.local_batch is not None):
            raise ValueError("local_epochs and local_batch are FedAvg settings; with protocol fedsgd each user sends one "
                             "gradient on its batch: drop them or set protocol: fedavg")
        if self.attack in TEXT_ATTACKS and self.lpips is not None:
            raise ValueError(f"lpips compares reconstructed images; attack = {self.attack!r} recovers tokens (allowed: "
                             "lpips with inverting-gradients, dlg or imprint)")
        if self.attack == "decepticons":
            self._decepticons_fits()
        elif self.attack == "text-inversion":
            self._text_inversion_fits()
        elif changed(self.text_inversion):
            raise ValueError(f"text_inversion ({', '.join(changed(self.text_inversion))}) "
                             f"configures the inversion of a language model's update (attack: text-inversion, or next "
                             f"to attack: decepticons); with attack = {self.attack!r} it does not apply (allowed: attack "
                             "text-inversion or decepticons, or drop text_inversion)")
        return self

    def _flower_fits(self) -> None:
        """``transport: flower``: what runs through Flower (imprint and the inversion attacks: FedSGD or FedAvg, secure
        aggregation or not, client defences, server-side clipping and noise; Decepticons: ReLU models, checked with
        the model in :func:`check_text`) and a loopback host."""
        if self.trials != 1 and self.rounds > 1:
            raise ValueError(f"rounds = {self.rounds} with trials = {self.trials}: a several-round Flower run is "
                             "one trial; allowed: trials: 1 with rounds > 1")
        from ..federated.address import check_address
        check_address(self.flower_host, allow_remote=self.allow_remote, field="flower_host")

    def _rounds_fit(self) -> None:
        """``rounds`` > 1: the imprint repeated (client defences each round) or FedAvg / FedSGD training under an
        inversion attack; one trial."""
        if self.attack == "imprint":
            if self.trials != 1:
                raise ValueError(f"rounds = {self.rounds} repeats the imprint attack over several rounds: trials = "
                                 f"{self.trials} not allowed with it (allowed with attack imprint: trials 1)")
            return
        bad = [f"attack = {self.attack!r}"] if self.attack not in ("inverting-gradients", "dlg") else []
        bad += [f"trials = {self.trials}"] if self.trials != 1 else []
        if bad:
            raise ValueError(f"rounds = {self.rounds} runs several rounds: {', '.join(bad)} not allowed with it (allowed: "
                             "attack imprint, inverting-gradients or dlg, with trials 1)")

    @property
    def local_steps(self) -> int:
        """A user's local SGD steps per round: 1 under FedSGD, local_epochs x ceil(batch / local_batch) under FedAvg."""
        if self.protocol == "fedsgd":
            return 1
        return self.local_epochs * -(-self.batch // (self.local_batch or self.batch))

    def _text_fits(self, model_words: str) -> None:
        """The text attacks' shared checks: a text source (or the user's token data) and a sequence model given
        by import string (the zoo holds classifiers)."""
        from ..data.registry import TEXT_SOURCES
        from ..imports import is_import_string

        name = self.dataset.name
        if name not in TEXT_SOURCES and not is_import_string(name):
            raise ValueError(f"attack = {self.attack!r} reads token sequences, but dataset.name = {name!r} is not a "
                             f"text source; allowed: {', '.join(TEXT_SOURCES)}, or your own token data as an import "
                             "string 'package.module:attr' (x [N, L] token ids, y [N] the next token)")
        if not self.model.is_user:
            raise ValueError(f"attack = {self.attack!r} {model_words}, but model.name = {self.model.name!r} is a zoo "
                             f"classifier; allowed: {TINY_GPT!r} (model.kwargs d_model, heads, layers, activation, "
                             "tie_embeddings) or your own factory as 'package.module:factory'")

    def _text_inversion_fits(self) -> None:
        """``attack: text-inversion``: the honest-but-curious inversion of one FedSGD or FedAvg round of any causal
        language model (the user's own by import string), secure aggregation or not; no Decepticons options."""
        self._text_fits("inverts a language model's update (forward(tokens [B, L]) -> next-token logits [B, V, L] "
                        "through an nn.Embedding)")
        t = self.text_inversion
        if t.run is False:
            raise ValueError("text_inversion.run = false with attack = 'text-inversion': the inversion is the attack; "
                             "allowed: drop text_inversion.run (or true), or choose another attack")
        if changed(self.decepticons):
            raise ValueError(f"decepticons ({', '.join(changed(self.decepticons))}) configures the "
                             "malicious parameters of attack 'decepticons'; with attack = 'text-inversion' the server "
                             "is honest: drop decepticons (the users inverted: text_inversion.user_counts)")
        if self.pretrain:
            raise ValueError("attack = 'text-inversion' with pretrain = True not allowed: the factory trains classifiers "
                             "(one label per example under recipe), not a language model on next-token targets; "
                             "allowed: pretrain false, with pretrained weights given as model.init (a state_dict file)")
        self._counts_fit("text_inversion.user_counts", t.user_counts)

    def _counts_fit(self, field: str, counts: tuple[int, ...] | None) -> None:
        if counts is not None:
            wrong = [n for n in counts if not 1 <= n <= self.users]
            if wrong or len(set(counts)) != len(counts):
                raise ValueError(f"{field} = {list(counts)}: allowed distinct counts with 1 <= n <= users = {self.users}")

    def _decepticons_fits(self) -> None:
        """``attack: decepticons`` reads token sequences through a TinyGPT on one FedSGD or FedAvg round, secure
        aggregation or not; a pretrained TinyGPT comes from ``model.init`` (``pretrain`` is refused)."""
        self._text_fits("plants its parameters in a GPT-style TinyGPT (a mlaudit.models.gpt.TinyGPT)")
        if self.text_inversion.user_counts is not None:
            raise ValueError(f"text_inversion.user_counts = {list(self.text_inversion.user_counts)} with attack = "
                             "'decepticons': the inversion runs at decepticons.user_counts; allowed: drop "
                             "text_inversion.user_counts, or set decepticons.user_counts")
        if self.pretrain:
            raise ValueError("attack = 'decepticons' with pretrain = True not allowed: the factory trains classifiers "
                             "(one label per example under recipe), not a language model on next-token targets; "
                             "allowed: pretrain false, with a pretrained TinyGPT given as model.init (its state_dict "
                             "file). The planting overwrites the token and position embeddings and the whole first "
                             "block, so of pretrained weights only the later blocks, the final LayerNorm and an untied "
                             "head are kept")
        o = self.decepticons
        self._counts_fit("decepticons.user_counts", o.user_counts)
        if self.model.name == TINY_GPT:  # mlaudit's own factory: its width is known before anything is built
            d, heads = self.model.kwargs.get("d_model", 64), self.model.kwargs.get("heads", 4)
            if isinstance(d, int) and o.bins is not None and o.bins > 4 * d:
                raise ValueError(f"decepticons.bins = {o.bins} exceeds the first MLP layer's width; allowed 1 <= bins "
                                 f"<= {4 * d} (4 x model.kwargs.d_model = 4 x {d})")
            if isinstance(heads, int) and o.tag and o.tag_tokens > heads:
                raise ValueError(f"decepticons.tag_tokens = {o.tag_tokens} exceeds the attention heads; allowed "
                                 f"1 <= tag_tokens <= {heads} (model.kwargs.heads: one head per tagged token)")

    @property
    def sequence_model(self) -> bool:
        """The text attacks' model reads tokens [N, L] and returns next-token logits [N, V, L]."""
        return self.attack in TEXT_ATTACKS

    @property
    def user_counts(self) -> tuple[int, ...]:
        """The numbers of users whose summed update a text attack reads (ascending)."""
        chosen = self.text_inversion.user_counts if self.attack == "text-inversion" else self.decepticons.user_counts
        return tuple(sorted(chosen or (self.users,)))

    @property
    def inverts_text(self) -> bool:
        """The honest-but-curious text inversion runs: the attack itself, or next to Decepticons."""
        return self.attack == "text-inversion" or (self.attack == "decepticons" and self.text_inversion.run)

    @property
    def decepticons_scale(self) -> float | None:
        """``decepticons.scale``, or its default: 1e-3 through Flower or under FedAvg (the server reads a difference of
        float32 weights: on the wire, or a user's weights after its local steps; ReLU models, GELU is refused there),
        else None (:func:`~mlaudit.attacks.federated.plant_decepticon`'s: 1 for ReLU, steep for GELU)."""
        return self.decepticons.scale or (1e-3 if self.transport == "flower" or self.protocol == "fedavg" else None)

    @property
    def imprint_scale(self) -> float:
        """``imprint.scale``, or its default: 1e-3 through Flower (float32 weights on the wire), else 1."""
        return self.imprint.scale or (1e-3 if self.transport == "flower" else 1.0)

    @property
    def inputs_per_update(self) -> int:
        return self.users * self.batch if self.aggregation.secure else self.batch


def changed(options: BaseModel) -> list[str]:
    """The fields of ``options`` whose values differ from its class's defaults (sorted): what a config set, in a
    way that survives a round trip through a dict holding every field."""
    default = type(options)()
    return sorted(k for k in type(options).model_fields if getattr(options, k) != getattr(default, k))


def user_shares(config: FederatedConfig, data: DataBundle, trial: int) -> tuple[list[Tensor], torch.Generator]:
    """Trial ``trial``'s partition of the training split among the users, and the generator (seeded from the
    trial's attack stream) that then draws the round's batches and the attack's randomness."""
    from ..federated import partition

    gen = torch.Generator().manual_seed(config.trial_seed(trial, stream=Stream.ATTACK))
    p = config.partition
    parts = partition(data.train.y, users=config.users, scheme=p.scheme, alpha=p.alpha,
                      classes_per_user=p.classes_per_user, min_size=config.batch, generator=gen)
    return parts, gen


def check_federated(config: FederatedConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): enough training examples for users x batch, inputs inside
    box, bins within the public (test) split and a measurement with distinct quantiles on it, every user's
    share of trial 0's partition at least batch."""
    from ..attacks.federated import plant_imprint

    n = len(data.train)
    if config.users * config.batch > n:
        raise ConfigError(f"users * batch = {config.users} * {config.batch} = {config.users * config.batch} inputs exceed "
                          f"the {n} examples of {data.name}'s training split; allowed users * batch <= {n}")
    if config.attack in TEXT_ATTACKS:
        (check_text if config.attack == "decepticons" else check_text_inversion)(config, data)
        user_shares(config, data, 0)
        return
    lo, hi = config.box
    x_min, x_max = float(data.train.x.min()), float(data.train.x.max())
    if x_min < lo - 1e-6 or x_max > hi + 1e-6:
        raise ConfigError(f"box {list(config.box)}: {data.name}'s inputs lie in [{x_min:.4g}, {x_max:.4g}], outside it; "
                          "set box to the inputs' value range")
    if config.lpips is not None:
        build_lpips(config).check_size(tuple(data.train.x.shape[1:]))
    if config.attack == "imprint" and config.imprint.variant == "parameters":
        check_parameter_imprint(config, data)
    elif config.attack == "imprint":
        plant_imprint(torch.nn.Identity(), data.test.x, bins=config.imprint.bins, measurement=config.imprint.measurement,
                      cdf=config.imprint.cdf, generator=torch.Generator().manual_seed(0))
    user_shares(config, data, 0)


def build_lpips(config: FederatedConfig) -> torch.nn.Module:
    """The ``lpips`` block's metric (files read, hashes checked); ConfigError naming the field otherwise."""
    from ..attacks.federated import lpips_alexnet
    from ..errors import DataError

    o = config.lpips
    assert o is not None
    try:
        return lpips_alexnet(o.backbone, o.lin, backbone_sha256=o.backbone_sha256, lin_sha256=o.lin_sha256,
                             box=config.box)
    except (ConfigError, DataError) as e:
        raise ConfigError(f"lpips: {e}") from e


def check_parameter_imprint(config: FederatedConfig, data: DataBundle) -> torch.nn.Module:
    """``imprint.variant: parameters``: the config's model, built for the data, takes the planted parameters
    (a first Linear with a bias on the flattened input, or behind size-keeping convolutions set to carry the input,
    ReLU, the next Linear; bins within its width), the preflight of
    :func:`mlaudit.attacks.federated.plant_imprint_parameters` on the public (test) inputs. Returns the planted
    ``ParameterImprint`` (where the bins went: ``layer``, ``next_layer``, the pass-through ``convs``)."""
    from ..attacks.federated import plant_imprint_parameters
    from ..models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    im = config.imprint
    try:
        return plant_imprint_parameters(model, data.test.x, bins=im.bins, layer=im.layer, next_layer=im.next_layer,
                                 measurement=im.measurement, cdf=im.cdf, feedback=im.feedback,
                                 scale=config.imprint_scale, generator=torch.Generator().manual_seed(0))
    except ConfigError as e:
        raise ConfigError(f"imprint.variant = 'parameters' (model {config.model.name!r}): {e}") from None


def check_text(config: FederatedConfig, data: DataBundle) -> None:
    """Decepticons' checks on the loaded data: token sequences x [N, L] of exact integer ids in [0, V), a
    model that builds as a TinyGPT for them, and the malicious parameters plant (bins within the first MLP
    layer's width, tag tokens within the heads, enough distinct measurements on the public text)."""
    from ..attacks.federated import plant_decepticon
    from ..models.gpt import TinyGPT

    model = _text_model(config, data)
    if not isinstance(model, TinyGPT):
        raise ConfigError(f"attack = 'decepticons': model {config.model.name!r} built a {type(model).__name__}; allowed: "
                          f"a mlaudit.models.gpt.TinyGPT (e.g. model: {TINY_GPT!r})")
    if config.transport == "flower" and model.activation != "relu":
        raise ConfigError(f"transport = 'flower' with attack = 'decepticons' and a {model.activation!r} TinyGPT "
                          f"(model {config.model.name!r}) not allowed: GELU needs bins so steep (decepticons.scale "
                          "about 12 / the smallest gap of the public measurements) that a FedSGD update lies below "
                          "float32 weights' precision on the wire (checked on pydoc-text: no pair recovered through "
                          "Flower against 37-82% in process); allowed: activation 'relu' with transport flower, or transport simulated")
    if config.protocol == "fedavg" and model.activation != "relu":
        raise ConfigError(f"protocol = 'fedavg' with attack = 'decepticons' and a {model.activation!r} TinyGPT "
                          f"(model {config.model.name!r}) not allowed: the server reads a user's float32 weights after "
                          "its local steps, and GELU's steep bins put the update below their precision, while at scale "
                          "1e-3 GELU's knee blurs the bins (checked on pydoc-text, 4 users, one local step: no pair "
                          "recovered at either scale against 34% with FedSGD); allowed: activation 'relu' with protocol "
                          "fedavg, or protocol fedsgd")
    o = config.decepticons
    try:
        plant_decepticon(model, data.test.x.round().long(), bins=o.bins or model.blocks[0].fc1.out_features,
                         scale=config.decepticons_scale, feedback=o.feedback, tag=o.tag, tag_tokens=o.tag_tokens,
                         generator=torch.Generator().manual_seed(0))
    except ConfigError as e:
        raise ConfigError(f"decepticons (model {config.model.name!r}, d_model {model.d_model}): {e}") from None


def _text_model(config: FederatedConfig, data: DataBundle) -> torch.nn.Module:
    """The text attacks' checks of the data (token sequences x [N, L] of exact integer ids in [0, V)) and the
    config's model built for it (the preflight has checked its output shape [N, V, L])."""
    from ..models.registry import build_model

    x = data.train.x
    if len(data.input_shape) != 1:
        raise ConfigError(f"attack = {config.attack!r}: dataset {data.name!r} has examples of shape "
                          f"{list(data.input_shape)}; allowed: token sequences x [N, L] (e.g. dataset pydoc-text)")
    if not bool(torch.equal(x, x.round())) or float(x.min()) < 0 or float(x.max()) >= data.num_classes:
        raise ConfigError(f"attack = {config.attack!r}: dataset {data.name!r} must hold token ids, exact integers in "
                          f"[0, {data.num_classes}) (its classes are the vocabulary); got values in "
                          f"[{float(x.min()):g}, {float(x.max()):g}]")
    with torch.random.fork_rng(devices=[]):
        return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)


def check_text_inversion(config: FederatedConfig, data: DataBundle) -> None:
    """``attack: text-inversion``'s checks on the loaded data: token sequences, and a model whose token embedding
    the attack finds (``text_inversion.embedding``, else ``get_input_embeddings()``, ``.tok`` or its only
    ``nn.Embedding``) with the vocabulary's rows."""
    from ..attacks.federated.text_inversion import token_embedding

    model = _text_model(config, data)
    where = config.text_inversion.embedding
    try:
        _, emb = token_embedding(model, where)
    except ConfigError as e:
        raise ConfigError(f"text_inversion.embedding = {where!r} (model {config.model.name!r}): {e}") from None
    if emb.num_embeddings < data.num_classes:
        raise ConfigError(f"text_inversion.embedding = {where!r} (model {config.model.name!r}): the token embedding has "
                          f"{emb.num_embeddings} rows, fewer than the {data.num_classes} tokens of {data.name!r}; "
                          "allowed: an nn.Embedding with a row per token of the vocabulary")
