"""Trainer configs as code: a named config is a function returning a `TrainConfig`; flags override its fields.

    python -m curation.train --config reference --data runs/corpus --workdir runs/reference --batch_size=128

`--smoke` shrinks any config to a run of seconds (a 1-layer model, a few steps) for tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from models.two_towers import ModelConfig

# The learning rate after the linear warm-up: "cosine" decays it to 0 at total_steps; "constant" holds the peak to
# the end, so a run that plateaus does so because of its data, not because its learning rate has run out.
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "reference"
    split: str = "curated"  # folder of the corpus to train on
    # Model (see models/two_towers.py); vocab_size comes from the tokenizer.
    image_variant: str = "xs"
    text_variant: str = "xs"
    image_size: int = 32
    patch_size: int = 4
    embed_dim: int = 128
    text_length: int = 16
    tokenizer: str = "words"  # "words" (vocabulary built from the training split) or "bytes"
    max_vocab: int = 2048
    # Optimization.
    loss: str = "sigmoid"  # or "softmax"
    # The loss selection scores both models with: "auto" is the learner's `loss`, or softmax when the reference is
    # a softmax (CLIP) model; "sigmoid" with a softmax reference is refused (it has no bias, no own-pair loss).
    selection_loss: str = "auto"
    batch_size: int = 128
    total_steps: int = 500
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    schedule: str = "cosine"  # after warm-up: "cosine" (to 0 at total_steps) or "constant" (the peak); SCHEDULES
    weight_decay: float = 1e-4
    seed: int = 0
    # The sigmoid loss's temperature t (exponentiated) and bias b at step 0, and how much faster than the other
    # params they learn (a multiplier of the learning rate). Adam moves a param by about the learning rate a step,
    # so over a few hundred steps at 1e-3 a multiplier of 1 leaves them where they started.
    temperature_init: float = 10.0
    bias_init: float = -10.0
    temperature_bias_lr_multiplier: float = 100.0  # chosen by bench/loss_parameters.py (bench/RESULTS.md)
    # JEST selection (curation/trainer/selection.py). batch_size is the sub-batch b trained on; with selection, each
    # step draws a super-batch of B = b / (1 - filter_ratio) examples from the scored shards (--scored).
    selection: str = "none"  # none | joint | independent | uniform
    score: str = "learnability"  # learnability | hard_learner | easy_reference
    filter_ratio: float = 0.8
    n_chunks: int = 16
    first_chunk: str = "score"  # score | uniform
    selection_noise: bool = True  # Gumbel sampling; False: greedy (joint) or top-k (independent)
    offline_keep: float = 1.0  # keep this fraction of the scored examples easiest for the reference (lowest stored
    # loss; highest cosine for a softmax reference)
    flexi: bool = False  # score the super-batch at flexi_patch_size, train half the sub-batch at each patch size
    flexi_patch_size: int = 0  # 0: twice patch_size
    # Input: 0 decodes images on 2 threads of the trainer's process; N > 0 in N worker processes
    # (curation/trainer/decode_pool.py). The batches are the same either way.
    input_processes: int = 0
    # The decoded images kept for the passes after the first, keyed by their bytes, in MiB (0: none); the batches are
    # the same either way.
    decode_cache_mb: int = 512
    learner_diagnostics: bool = False  # with a score that needs no learner pass: run it anyway to log learnability
    # Bookkeeping.
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    eval_size: int = 0  # examples per eval split to use; 0 = all

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            image_variant=self.image_variant,
            text_variant=self.text_variant,
            image_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            text_length=self.text_length,
            vocab_size=vocab_size,
            log_temperature_init=math.log(self.temperature_init),
            bias_init=self.bias_init,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def superbatch_size(self) -> int:
        """B: the examples a step draws (b when there is no selection)."""
        if self.selection == "none":
            return self.batch_size
        if not 0.0 <= self.filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must be in [0, 1), got {self.filter_ratio}")
        return int(round(self.batch_size / (1.0 - self.filter_ratio)))

    @property
    def coarse_patch_size(self) -> int:
        return self.flexi_patch_size or 2 * self.patch_size

    @property
    def needs_scores(self) -> bool:
        """Whether the run reads scored shards (selection or offline filtering) rather than the raw corpus."""
        return self.selection != "none" or self.offline_keep < 1.0

    @property
    def uses_learner_scores(self) -> bool:
        """Whether selection needs the learner's pass over the super-batch (charged to the run's online FLOPs)."""
        return self.selection in ("joint", "independent") and self.score != "easy_reference"

    @property
    def uses_reference_scores(self) -> bool:
        """Whether the run needs the reference's scores (so the offline scoring pass counts as its cost)."""
        selects_by_reference = self.selection in ("joint", "independent") and self.score != "hard_learner"
        return selects_by_reference or self.offline_keep < 1.0


def reference() -> TrainConfig:
    """The reference model: trained on the small, clean `curated` split."""
    return TrainConfig(name="reference", split="curated")


def uniform() -> TrainConfig:
    """A learner on the noisy `web` split with no selection (the baseline JEST is compared against)."""
    return TrainConfig(name="uniform", split="web")


def jest() -> TrainConfig:
    """JEST: joint learnability selection of b from B = 5b (f = 0.8) in 16 chunks, on the web split's scored shards."""
    return TrainConfig(name="jest", split="web", selection="joint", score="learnability", filter_ratio=0.8, n_chunks=16)


def jest_flexi() -> TrainConfig:
    """Flexi-JEST: the learner scores the super-batch at twice the patch size; half the sub-batch trains at each."""
    return dataclasses.replace(jest(), name="jest_flexi", flexi=True)


def independent() -> TrainConfig:
    """Baseline: examples sampled independently by their own learnability, each one's share of the super-batch's
    summed learner-minus-reference loss (RHO-LOSS style)."""
    return dataclasses.replace(jest(), name="independent", selection="independent")


def hard_learner() -> TrainConfig:
    """Baseline: joint selection by the learner's loss alone."""
    return dataclasses.replace(jest(), name="hard_learner", score="hard_learner")


def easy_reference() -> TrainConfig:
    """Baseline: joint selection by the reference's (negative) loss alone."""
    return dataclasses.replace(jest(), name="easy_reference", score="easy_reference")


def offline_filter() -> TrainConfig:
    """Baseline: keep the 30% of scored examples easiest for the reference (stored loss), then train uniformly."""
    return TrainConfig(name="offline_filter", split="web", offline_keep=0.3)


CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "reference": reference,
    "uniform": uniform,
    "jest": jest,
    "jest_flexi": jest_flexi,
    "independent": independent,
    "hard_learner": hard_learner,
    "easy_reference": easy_reference,
    "offline_filter": offline_filter,
}

SMOKE = dict(
    image_variant="mu",
    text_variant="mu",
    image_size=32,
    patch_size=8,
    embed_dim=32,
    batch_size=16,
    total_steps=6,
    warmup_steps=2,
    log_every=2,
    eval_every=3,
    checkpoint_every=2,
    eval_size=64,
)


def get_config(name: str, smoke: bool = False, overrides: dict[str, str] | None = None) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    config = CONFIGS[name]()
    if smoke:
        config = dataclasses.replace(config, **SMOKE)
    return apply_overrides(config, overrides or {})


def apply_overrides(config: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Set fields from strings (command-line values), converted to each field's type."""
    fields = {field.name: field for field in dataclasses.fields(config)}
    values = {}
    for name, text in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown config field {name!r}; fields: {sorted(fields)}")
        kind = type(getattr(config, name))
        if kind is bool:
            values[name] = text.lower() in ("1", "true", "yes")
        else:
            values[name] = kind(text)
    return dataclasses.replace(config, **values)
