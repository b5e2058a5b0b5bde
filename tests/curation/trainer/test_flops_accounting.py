"""Online and offline FLOPs, counted the same way for every method, from known per-example
costs; and Flexi's two resolutions as a random split of the selected sub-batch."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curation.shared import scored_set
from curation.trainer import configs, training_step
from curation.trainer.loop import make_mesh, make_optimizer, offline_flops
from curation.trainer.metrics import train_row
from curation.trainer.training_step import train_step
from models.flops import example_forward_flops
from models.two_towers import TwoTower, init_params

SCORED = str(pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "before_v2" / "scored_v1")


def run_rows(config: configs.TrainConfig, scored: scored_set.ScoredSet, steps: int) -> dict:
    """The metrics row the trainer writes after `steps` steps of `config`."""
    model_config = config.model_config(vocab_size=259)
    flops = {**training_step.step_flops(config, model_config), **offline_flops(config, scored)}
    drawn = steps * config.superbatch_size
    progress = {
        "examples_seen": steps * config.batch_size,
        "superbatch_examples_seen": drawn,
        "wall_s": 0.0,
        "position": {"raw_seen": drawn},
    }
    return train_row(steps, {}, progress, flops, {}, steps_logged=1)


@pytest.mark.parametrize("name", ["uniform", "offline_filter", "easy_reference", "hard_learner", "jest", "jest_flexi"])
def test_online_and_offline_flops_from_known_per_example_costs(name):
    scored = scored_set.open_scored(SCORED)
    per_scored_example, examples_scored = scored.reference.forward_flops_per_example, scored.scored
    assert per_scored_example > 0 and examples_scored == 12
    config = configs.get_config(name, smoke=True)
    model_config = config.model_config(vocab_size=259)
    fine, coarse = example_forward_flops(model_config), example_forward_flops(model_config, 2 * config.patch_size)
    b, B = config.batch_size, config.superbatch_size
    update = {"jest_flexi": b // 2 * 3 * fine + b // 2 * 3 * coarse}.get(name, b * 3 * fine)  # forward + backward
    learner_pass = {"jest": B * fine, "jest_flexi": B * coarse, "hard_learner": B * fine}.get(name, 0)
    uses_reference = name not in ("uniform", "hard_learner")

    for steps in (1, 10):
        row = run_rows(config, scored, steps)
        assert row["online_flops"] == steps * (update + learner_pass)
        assert row["train_flops"] == steps * update and row["learner_scoring_flops"] == steps * learner_pass
        # The reference ran once per example scored: the same charge after 1 step or 10, however many were drawn.
        assert row["offline_scoring_flops"] == (examples_scored * per_scored_example if uses_reference else 0)
        assert row["reference_flops_per_example"] == per_scored_example


def test_easy_reference_runs_no_learner_pass_unless_a_diagnostic_asks_and_then_is_not_charged():
    config = configs.get_config("easy_reference", smoke=True)
    model_config = config.model_config(vocab_size=259)
    model, optimizer = TwoTower(model_config), make_optimizer(config)
    mesh = make_mesh(config.superbatch_size, jax.devices()[:1])
    update = functools.partial(train_step, model=model, optimizer=optimizer, loss_name="sigmoid")
    assert training_step.make_jest_functions(config, model, update, mesh, 10.0, -10.0).embed is None
    asked = dataclasses.replace(config, learner_diagnostics=True)
    assert training_step.make_jest_functions(asked, model, update, mesh, 10.0, -10.0).embed is not None
    assert training_step.step_flops(asked, model_config)["learner_scoring"] == 0
    assert (
        training_step.make_jest_functions(
            configs.get_config("jest", smoke=True), model, update, mesh, 10.0, -10.0
        ).embed
        is not None
    )


def test_flexi_halves_are_a_random_split_of_the_picks():
    picks = jnp.arange(100, 116)  # the selected sub-batch, in pick order
    fine_halves = [np.asarray(training_step.flexi_order(jax.random.key(seed), picks))[:8] for seed in range(200)]
    assert all(
        sorted(np.concatenate([half, np.setdiff1d(picks, half)])) == list(range(100, 116)) for half in fine_halves
    )
    share_fine = np.mean([np.isin(picks, half) for half in fine_halves], axis=0)  # per pick
    assert np.all((share_fine > 0.35) & (share_fine < 0.65))  # every pick trains at either size half the time
    first_picks_in_fine = [np.isin(picks[:8], half).mean() for half in fine_halves]
    assert 0.4 < np.mean(first_picks_in_fine) < 0.6 and min(first_picks_in_fine) < 1


def test_the_flexi_update_splits_by_the_step_rng():
    config = configs.get_config("jest_flexi", smoke=True)
    model_config = config.model_config(vocab_size=259)
    model, optimizer = TwoTower(model_config), make_optimizer(config)
    mesh = make_mesh(config.superbatch_size, jax.devices()[:1])
    update = functools.partial(
        train_step, model=model, optimizer=optimizer, loss_name="sigmoid", flexi_patch=config.coarse_patch_size
    )
    params = jax.tree_util.tree_map(np.asarray, init_params(model_config, jax.random.key(0)))  # the update donates
    rng = np.random.default_rng(0)
    B = config.superbatch_size
    images = rng.uniform(-1, 1, size=(B, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(3, 259, size=(B, config.text_length)).astype(np.int32)
    indices = jnp.arange(config.batch_size)

    def loss(flexi: bool, seed: int) -> float:
        fns = training_step.make_jest_functions(
            dataclasses.replace(config, flexi=flexi), model, update, mesh, 10.0, -10.0
        )
        state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros([], jnp.int32)}
        return float(fns.update(state, images, tokens, indices, jax.random.key(seed))[1]["loss"])

    flexi = [loss(True, seed) for seed in range(3)]
    assert len(set(flexi)) == 3  # another RNG puts other examples at the coarse patch
    assert loss(False, 0) == loss(False, 1)  # without Flexi the RNG does not enter the update
