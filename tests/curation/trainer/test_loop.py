import dataclasses
import json
import os
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curation.trainer import configs
from curation.trainer.loop import make_mesh, train
from curation.trainer.metrics import read_metrics
from models import checkpoint
from tests.four_devices import run_on_four_cpu_devices

SMOKE = configs.get_config("reference", smoke=True)
BEFORE_V2 = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "fixtures", "before_v2")
# The overrides tests/fixtures/before_v2/make/make_train_fixture.py ran its 2-step uniform smoke run with; the
# temperature and bias then learnt at the plain learning rate (multiplier 1), whose optimizer state it saved.
OLD_RUN = configs.get_config(
    "uniform",
    smoke=True,
    overrides={
        "total_steps": "2",
        "checkpoint_every": "2",
        "embed_dim": "8",
        "text_length": "8",
        "image_size": "16",
        "tokenizer": "bytes",
        "batch_size": "4",
        "eval_size": "4",
        "max_vocab": "64",
        "temperature_bias_lr_multiplier": "1",
    },
)


def _params_bytes(params):
    return [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(params)]


def _killed_at_step_5(config, corpus, workdir) -> str:
    """Train until step 5 raises (as a kill would end the run); returns the checkpoints folder."""

    def kill_at_step_5(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, corpus, workdir, step_callback=kill_at_step_5)
    return os.path.join(workdir, "checkpoints")


def test_smoke_run_writes_metrics_events_checkpoints_and_the_model(tiny_corpus, tmp_path):
    workdir = str(tmp_path / "run")
    params = train(SMOKE, tiny_corpus, workdir)
    rows = read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    eval_rows = [row for row in rows if "zeroshot_top1" in row]
    assert [row["step"] for row in train_rows] == [2, 4, 6]
    assert [row["step"] for row in eval_rows] == [3, 6]
    for row in eval_rows:
        assert {"i2t_r1", "t2i_r1", "i2t_r5", "zeroshot/shape", "zeroshot/colour", "held_out_loss"} <= set(row)
        assert 0.0 <= row["zeroshot_top1"] <= 1.0
    assert train_rows[-1]["examples_seen"] == 6 * SMOKE.batch_size
    assert train_rows[-1]["train_flops"] > train_rows[0]["train_flops"] > 0
    assert all(np.isfinite(row["loss"]) for row in train_rows)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    # The final model is what the scoring job loads: config, tokenizer and fingerprint with it.
    model = checkpoint.restore(os.path.join(workdir, "model"))
    assert model.config.image_variant == "mu"
    assert _params_bytes(model.params) == _params_bytes(params)
    assert model.fingerprint == checkpoint.fingerprint(params, model.config, model.tokenizer)


def test_killed_run_resumes_to_exactly_the_uninterrupted_params(tiny_corpus, tmp_path):
    config = dataclasses.replace(SMOKE, eval_every=100)
    straight = train(config, tiny_corpus, str(tmp_path / "straight"))

    class Killed(Exception):
        pass

    def kill_at_step_5(step):
        if step == 5:
            raise Killed

    workdir = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train(config, tiny_corpus, workdir, step_callback=kill_at_step_5)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    resumed = train(config, tiny_corpus, workdir)
    assert _params_bytes(resumed) == _params_bytes(straight)
    # Metrics of the lost step were dropped, not duplicated.
    steps = [row["step"] for row in read_metrics(workdir) if "loss" in row]
    assert steps == [2, 4, 6]


def test_a_run_written_before_v2_resumes(tmp_path):
    corpus = os.path.join(BEFORE_V2, "corpus")
    fixture = os.path.join(BEFORE_V2, "uniform_run")
    old_params = checkpoint.restore(os.path.join(fixture, "model")).params

    # Its checkpoint at step 2 is its last: a run to step 2 restores it and trains nothing.
    finished = str(tmp_path / "finished")
    shutil.copytree(fixture, finished)
    assert _params_bytes(train(OLD_RUN, corpus, finished)) == _params_bytes(old_params)

    # A run to step 3 resumes from step 2 (its data position and counters too) and trains one step.
    workdir = str(tmp_path / "longer")
    shutil.copytree(fixture, workdir)
    params = train(dataclasses.replace(OLD_RUN, total_steps=3), corpus, workdir)
    train_rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert [row["step"] for row in train_rows] == [2, 3]
    assert train_rows[-1]["examples_seen"] == 3 * OLD_RUN.batch_size
    assert train_rows[-1]["wall_s"] > train_rows[0]["wall_s"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    assert _params_bytes(params) != _params_bytes(old_params)
    assert _params_bytes(checkpoint.restore(os.path.join(workdir, "model")).params) == _params_bytes(params)


def test_a_half_written_checkpoint_is_ignored_on_resume(tiny_corpus, tmp_path):
    config = dataclasses.replace(SMOKE, eval_every=100)
    workdir = str(tmp_path / "run")
    checkpoints = _killed_at_step_5(config, tiny_corpus, workdir)
    # What a run killed while saving step 6 leaves: orbax's temporary folder, never finalized.
    os.makedirs(os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1234", "state"))
    resumed = train(config, tiny_corpus, workdir)
    assert sorted(name for name in os.listdir(checkpoints) if name.isdigit()) == ["4", "6"]
    straight = train(config, tiny_corpus, str(tmp_path / "straight"))
    assert _params_bytes(resumed) == _params_bytes(straight)


def test_a_poisoned_batch_stops_the_run_naming_the_steps(tmp_path, tiny_corpus):
    rng = np.random.default_rng(0)

    def batches():
        for step in range(1, 100):
            image = rng.uniform(-1, 1, size=(16, 32, 32, 3)).astype(np.float32)
            if step == 3:
                image[0, 0, 0, 0] = np.nan
            yield {"image": image, "tokens": rng.integers(3, 60, size=(16, SMOKE.text_length)).astype(np.int32)}

    config = dataclasses.replace(SMOKE, log_every=2, checkpoint_every=3, total_steps=6)
    # Checkpointing at step 3 checks the pending steps first: the poisoned state is never saved.
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3 \(steps 3-3 checked"):
        train(config, tiny_corpus, str(tmp_path / "run"), batches=batches())
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints", "3"))


def test_batch_size_must_divide_the_device_count():
    with pytest.raises(ValueError, match="batch size 6 does not divide over 4 devices"):
        make_mesh(6, devices=jax.devices()[:1] * 4)


def test_four_cpu_devices_give_the_same_step_as_one(tmp_path):
    script = textwrap.dedent("""
        import functools, json, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from curation.trainer import configs
        from curation.trainer.training_step import train_step
        from curation.trainer.loop import make_mesh, make_optimizer
        from models.two_towers import TwoTower, init_params

        assert jax.device_count() == 4, jax.devices()
        config = configs.get_config("reference", smoke=True)
        model_config = config.model_config(vocab_size=259)
        optimizer = make_optimizer(config)
        params = init_params(model_config, jax.random.key(0))
        rng = np.random.default_rng(0)
        batch = {"image": rng.uniform(-1, 1, size=(16, 32, 32, 3)).astype(np.float32),
                 "tokens": rng.integers(3, 259, size=(16, config.text_length)).astype(np.int32)}
        results = {}
        for n in (1, 4):
            mesh = make_mesh(16, jax.devices()[:n])
            data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
            state = jax.device_put({"params": params, "opt_state": optimizer.init(params),
                                    "step": jnp.zeros([], jnp.int32)}, replicated)
            step = jax.jit(functools.partial(train_step, model=TwoTower(model_config), optimizer=optimizer,
                                             loss_name="sigmoid"),
                           in_shardings=(replicated, data), out_shardings=(replicated, replicated))
            sharded = {k: jax.device_put(v, data) for k, v in batch.items()}
            assert len(sharded["image"].sharding.device_set) == n
            for _ in range(2):
                state, metrics = step(state, sharded)
            results[n] = {"loss": float(metrics["loss"]),
                          "head": np.asarray(state["params"]["image_tower"]["head"]["kernel"]).tolist()}
        json.dump(results, sys.stdout)
    """)
    results = run_on_four_cpu_devices(script)
    assert results["1"]["loss"] == pytest.approx(results["4"]["loss"], rel=1e-5)
    np.testing.assert_allclose(results["1"]["head"], results["4"]["head"], rtol=1e-4, atol=1e-6)


def test_the_temperature_and_bias_learn_at_their_own_rate():
    import optax

    from curation.trainer.loop import make_optimizer
    from models.two_towers import init_params

    def first_step(multiplier: float) -> dict[str, float]:
        """How far one step moves t, b and a text-tower param, from the configured initial t and b."""
        config = dataclasses.replace(
            SMOKE, temperature_bias_lr_multiplier=multiplier, warmup_steps=0, temperature_init=5.0, bias_init=-3.0
        )
        params = init_params(config.model_config(259), jax.random.key(0))
        assert float(jnp.exp(params["log_temperature"][0])) == pytest.approx(5.0)
        assert float(params["bias"][0]) == -3.0
        optimizer = make_optimizer(config)
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        moved = jax.tree_util.tree_map(
            lambda new, old: abs(float((new - old).ravel()[0])), optax.apply_updates(params, updates), params
        )
        return {
            "t": moved["log_temperature"],
            "b": moved["bias"],
            "other": jax.tree_util.tree_leaves(moved["text_tower"])[0],
        }

    plain, fast = first_step(1.0), first_step(100.0)
    assert fast["t"] == pytest.approx(100 * plain["t"], rel=1e-4) and plain["t"] > 0
    assert fast["b"] == pytest.approx(100 * plain["b"], rel=1e-4)
    assert fast["other"] == pytest.approx(plain["other"], rel=1e-6) and plain["other"] > 0


def _schedule_config(schedule: str, **changes) -> configs.TrainConfig:
    return dataclasses.replace(
        SMOKE, **{"schedule": schedule, "learning_rate": 1e-3, "warmup_steps": 10, "total_steps": 100, **changes}
    )


def test_the_constant_schedule_warms_up_linearly_then_holds_the_peak_to_the_end():
    from curation.trainer.loop import learning_rate_schedule

    constant = learning_rate_schedule(_schedule_config("constant"))
    cosine = learning_rate_schedule(_schedule_config("cosine"))
    assert float(constant(0)) == 0.0
    for step in (1, 3, 5, 9):  # the same linear warm-up as cosine's: step/warmup of the peak
        assert float(constant(step)) == pytest.approx(1e-3 * step / 10, rel=1e-6)
        assert float(constant(step)) == float(cosine(step))
    for step in (10, 11, 50, 75, 99, 100, 150):  # the peak, exactly, from the warm-up's end to the last step and on
        assert float(constant(step)) == np.float32(1e-3)
    # Without warm-up it starts at the peak (a linear warm-up over 0 steps alone would hold it at 0).
    assert float(learning_rate_schedule(_schedule_config("constant", warmup_steps=0))(0)) == np.float32(1e-3)


def test_the_cosine_schedule_is_as_before():
    import optax

    from curation.trainer.loop import learning_rate_schedule

    assert configs.TrainConfig().schedule == "cosine"
    assert all(make().schedule == "cosine" for make in configs.CONFIGS.values())
    cosine = learning_rate_schedule(_schedule_config("cosine"))
    before = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    for step in (0, 5, 10, 30, 55, 80, 99, 100):
        assert float(cosine(step)) == float(before(step))
    assert float(cosine(10)) == pytest.approx(1e-3)
    assert float(cosine(55)) == pytest.approx(0.5e-3, rel=1e-5)  # half-way through the decay: half the peak
    assert float(cosine(100)) == 0.0


def test_the_optimizer_steps_at_the_schedules_rate():
    """Adam's step on a constant gradient is about the learning rate: at the last of 100 steps the constant
    schedule's is the peak, cosine's nearly 0."""
    import optax

    from curation.trainer.loop import make_optimizer

    def last_step(schedule: str) -> float:
        config = _schedule_config(schedule, weight_decay=0.0, temperature_bias_lr_multiplier=1.0)
        optimizer, params = make_optimizer(config), {"w": jnp.ones((2, 2))}
        state, grads = optimizer.init(params), {"w": jnp.ones((2, 2))}
        for _ in range(100):
            updates, state = optimizer.update(grads, state, params)
        return float(-updates["w"][0, 0])

    assert last_step("constant") == pytest.approx(1e-3, rel=1e-3)
    at_99 = float(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)(99))
    assert last_step("cosine") == pytest.approx(at_99, rel=1e-3)
    assert last_step("cosine") < 1e-5


def test_an_unknown_schedule_is_refused_naming_the_known_ones():
    from curation.trainer.loop import learning_rate_schedule

    with pytest.raises(ValueError, match="unknown schedule 'linear'; known: cosine, constant"):
        dataclasses.replace(SMOKE, schedule="linear")
    with pytest.raises(ValueError, match="unknown schedule 'Constant'; known: cosine, constant"):
        configs.get_config("uniform", overrides={"schedule": "Constant"})
    assert configs.get_config("uniform", overrides={"schedule": "constant"}).schedule == "constant"
    unchecked = dataclasses.replace(SMOKE)
    object.__setattr__(unchecked, "schedule", "linear")  # past the config's own check
    with pytest.raises(ValueError, match="unknown schedule 'linear'; known: cosine, constant"):
        learning_rate_schedule(unchecked)


def test_the_schedule_is_saved_and_a_run_saved_before_it_existed_resumes_as_cosine(tmp_path):
    from curation.trainer.workdir import check_workdir, read_run_config, write_run_config

    # A run written before the field: no "schedule" in its config.json, read as cosine.
    old_workdir = os.path.join(BEFORE_V2, "uniform_run")
    assert "schedule" not in json.load(open(os.path.join(old_workdir, "config.json")))
    assert read_run_config(os.path.join(old_workdir, "config.json"))["schedule"] == "cosine"
    check_workdir(OLD_RUN, old_workdir, None, start_over=False)  # resumes as cosine
    with pytest.raises(ValueError, match=r"another config: schedule \(saved 'cosine', now 'constant'\)"):
        check_workdir(dataclasses.replace(OLD_RUN, schedule="constant"), old_workdir, None, start_over=False)

    # A run now: its config.json holds its schedule, and it resumes only with that schedule.
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    constant = dataclasses.replace(SMOKE, schedule="constant")
    write_run_config(workdir, constant, None)
    assert json.load(open(os.path.join(workdir, "config.json")))["schedule"] == "constant"
    check_workdir(constant, workdir, None, start_over=False)
    with pytest.raises(ValueError, match=r"another config: schedule \(saved 'constant', now 'cosine'\)"):
        check_workdir(SMOKE, workdir, None, start_over=False)


def test_a_workdir_of_another_config_is_refused_naming_the_fields_unless_starting_over(tiny_corpus, tmp_path):
    from curation.train import main

    workdir = str(tmp_path / "run")
    train(SMOKE, tiny_corpus, workdir)
    saved = open(os.path.join(workdir, "config.json")).read()
    changed = dataclasses.replace(SMOKE, learning_rate=SMOKE.learning_rate * 2, seed=SMOKE.seed + 1)
    with pytest.raises(ValueError, match=r"another config: learning_rate \(saved .*, now .*\), seed") as refused:
        train(changed, tiny_corpus, workdir)
    assert "--start_over" in str(refused.value)
    assert open(os.path.join(workdir, "config.json")).read() == saved  # nothing written
    # The command line refuses in one line, before any work.
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--config", "reference", "--smoke", "--data", tiny_corpus, "--workdir", workdir, "--learning_rate", "0.5"]
        )
    assert exit_info.value.code == 2
    # Reporting fields may change on a resume; with start_over the other run's files go and it trains anew.
    train(dataclasses.replace(SMOKE, log_every=3), tiny_corpus, workdir)
    params = train(changed, tiny_corpus, workdir, start_over=True)
    assert json.load(open(os.path.join(workdir, "config.json")))["learning_rate"] == changed.learning_rate
    assert _params_bytes(params) == _params_bytes(train(changed, tiny_corpus, str(tmp_path / "fresh")))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tiny_corpus, tmp_path, caplog):
    config = dataclasses.replace(SMOKE, eval_every=100, checkpoint_every=2)
    workdir = str(tmp_path / "run")
    checkpoints = _killed_at_step_5(config, tiny_corpus, workdir)
    assert sorted(name for name in os.listdir(checkpoints) if name.isdigit()) == ["2", "4"]
    for folder, _, names in os.walk(os.path.join(checkpoints, "4", "state")):  # every data file cut short
        for name in names:
            path = os.path.join(folder, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)
    caplog.set_level("WARNING", logger="curation.trainer")
    resumed = train(config, tiny_corpus, workdir)
    [warning] = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert "step 4" in warning and "corrupt_step_4" in warning and "resuming from step 2" in warning
    assert os.path.isdir(os.path.join(checkpoints, "corrupt_step_4"))
    assert _params_bytes(resumed) == _params_bytes(train(config, tiny_corpus, str(tmp_path / "straight")))


def test_sigterm_saves_a_checkpoint_and_exits_and_the_run_resumes_exactly(tiny_corpus, tmp_path):
    import signal

    from curation.trainer.loop import Preempted

    config = dataclasses.replace(SMOKE, eval_every=100, checkpoint_every=100)

    def terminate_at_step_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted, match="saved the checkpoint of step 3"):
        train(config, tiny_corpus, workdir, step_callback=terminate_at_step_3)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(name for name in os.listdir(checkpoints) if name.isdigit()) == ["3"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    resumed = train(config, tiny_corpus, workdir)
    assert _params_bytes(resumed) == _params_bytes(train(config, tiny_corpus, str(tmp_path / "straight")))
