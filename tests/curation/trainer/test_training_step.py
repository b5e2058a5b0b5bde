import dataclasses
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curation.shared import scored_set
from curation.trainer import configs, training_step
from curation.trainer.loop import make_optimizer, train
from curation.trainer.metrics import read_metrics
from curation.trainer.training_step import train_step
from models.losses import sigmoid_loss
from models.two_towers import TwoTower, init_params
from tests.four_devices import run_on_four_cpu_devices

JEST_SMOKE = configs.get_config("jest", smoke=True)


def test_jest_run_reports_selection_cleanliness_flops_and_time_split(tiny_corpus, scored_tiny_corpus, tmp_path):
    workdir = str(tmp_path / "jest")
    train(JEST_SMOKE, tiny_corpus, workdir, scored_dir=scored_tiny_corpus)
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]
    last = rows[-1]
    assert JEST_SMOKE.superbatch_size == 5 * JEST_SMOKE.batch_size
    assert last["superbatch_examples_seen"] == 5 * last["examples_seen"] == 5 * 6 * JEST_SMOKE.batch_size
    for name in ("selected_clean", "superbatch_clean"):
        assert all(0.0 <= row[name] <= 1.0 for row in rows)
    assert all(np.isfinite(row["selected_learnability"]) and np.isfinite(row["random_learnability"]) for row in rows)
    assert all(row[f"time/{part}"] > 0 for row in rows for part in ("data", "scoring", "selection", "update"))
    flops = training_step.step_flops(JEST_SMOKE, JEST_SMOKE.model_config(vocab_size=259))
    assert last["learner_scoring_flops"] == 6 * flops["learner_scoring"] > 0
    assert last["online_flops"] == last["train_flops"] + last["learner_scoring_flops"]
    examples_scored = scored_set.open_scored(scored_tiny_corpus).scored
    assert last["offline_scoring_flops"] == examples_scored * last["reference_flops_per_example"] > 0
    assert all(0 <= row["offdiag_share"] <= 1 for row in rows) and rows[-1]["offdiag_share"] > 0
    assert any("zeroshot_top1" in row for row in read_metrics(workdir))
    for axis in ("difficulty", "frequency"):  # the demo corpus's buckets, each axis's shares adding up to one
        shares = [value for name, value in last.items() if name.startswith(f"superbatch/{axis}/")]
        assert shares and sum(shares) == pytest.approx(1.0, abs=1e-4)


def test_easy_reference_trains_without_a_learner_pass(tiny_corpus, scored_tiny_corpus, tmp_path):
    workdir = str(tmp_path / "easy")
    train(configs.get_config("easy_reference", smoke=True), tiny_corpus, workdir, scored_dir=scored_tiny_corpus)
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert all(row["learner_scoring_flops"] == 0 and "selected_learnability" not in row for row in rows)
    assert all(0.0 <= row["selected_clean"] <= 1.0 for row in rows) and rows[-1]["offline_scoring_flops"] > 0
    assert all(row["time/scoring"] < 0.01 for row in rows)  # nothing ran


def test_selection_configs_need_scored_shards(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="--scored"):
        train(JEST_SMOKE, tiny_corpus, str(tmp_path / "run"))


def test_killed_jest_run_resumes_to_exactly_the_uninterrupted_params(tiny_corpus, scored_tiny_corpus, tmp_path):
    config = dataclasses.replace(JEST_SMOKE, eval_every=100)
    straight = train(config, tiny_corpus, str(tmp_path / "straight"), scored_dir=scored_tiny_corpus)

    class Killed(Exception):
        pass

    def kill_at_step_3(step):
        if step == 3:
            raise Killed

    workdir = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train(config, tiny_corpus, workdir, scored_dir=scored_tiny_corpus, step_callback=kill_at_step_3)
    resumed = train(config, tiny_corpus, workdir, scored_dir=scored_tiny_corpus)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flexi_step_trains_half_the_batch_at_the_coarse_patch_size():
    config = configs.get_config("jest_flexi", smoke=True)
    model_config = config.model_config(vocab_size=259)
    model, optimizer = TwoTower(model_config), make_optimizer(config)
    params = init_params(model_config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, size=(8, 32, 32, 3)).astype(np.float32),
        "tokens": rng.integers(3, 259, size=(8, config.text_length)).astype(np.int32),
    }
    state = {"params": params, "opt_state": optimizer.init(params), "step": 0}
    step = functools.partial(train_step, model=model, optimizer=optimizer, loss_name="sigmoid")
    _, fine = jax.jit(step)(state, batch)
    _, flexi = jax.jit(functools.partial(step, flexi_patch=config.coarse_patch_size))(state, batch)

    @jax.jit
    def expected_loss(params):
        zimg = jnp.concatenate(
            [
                model.apply({"params": params}, batch["image"][:4], None)[0],
                model.apply({"params": params}, batch["image"][4:], None, patch_size=16)[0],
            ]
        )
        ztxt = model.apply({"params": params}, None, batch["tokens"])[1]
        return sigmoid_loss(zimg, ztxt, jnp.exp(params["log_temperature"][0]), params["bias"][0])

    expected = expected_loss(params)
    assert float(flexi["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(flexi["loss"]) != pytest.approx(float(fine["loss"]), rel=1e-6)
    flops = training_step.step_flops(config, model_config)
    assert (
        flops["learner_scoring"]
        < training_step.step_flops(dataclasses.replace(config, flexi=False), model_config)["learner_scoring"]
    )


def test_a_jest_step_on_four_cpu_devices_selects_and_updates_as_on_one():
    script = textwrap.dedent("""
        import functools, json, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from curation.shared import scored_set
        from curation.trainer import configs, training_step
        from curation.trainer.training_step import train_step
        from curation.trainer.loop import make_mesh, make_optimizer
        from models.two_towers import TwoTower, init_params

        assert jax.device_count() == 4, jax.devices()
        config = configs.get_config("jest", smoke=True)
        model_config = config.model_config(vocab_size=259)
        model, optimizer = TwoTower(model_config), make_optimizer(config)
        params = jax.tree_util.tree_map(np.asarray, init_params(model_config, jax.random.key(0)))  # host copies
        rng = np.random.default_rng(0)
        B = config.superbatch_size
        ref = rng.normal(size=(2, B, 16)).astype(np.float32)
        ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
        batch = {"image": rng.uniform(-1, 1, size=(B, 32, 32, 3)).astype(np.float32),
                 "tokens": rng.integers(3, 259, size=(B, config.text_length)).astype(np.int32),
                 "ref_zimg": ref[0], "ref_ztxt": ref[1], "truth": rng.integers(0, 2, size=B).astype(np.int32)}
        results = {}
        for n in (1, 4):
            mesh = make_mesh(B, jax.devices()[:n])
            data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
            pure = functools.partial(train_step, model=model, optimizer=optimizer, loss_name="sigmoid")
            fns = training_step.make_jest_functions(config, model, pure, mesh, 10.0, -10.0)
            state = jax.device_put({"params": params, "opt_state": optimizer.init(params),
                                    "step": jnp.zeros([], jnp.int32)}, replicated)
            sharded = {k: jax.device_put(v, data) for k, v in batch.items()}
            learned = fns.embed(state["params"], sharded["image"], sharded["tokens"])
            indices, diagnostics = fns.choose(jax.random.key(3), learned, sharded["ref_zimg"], sharded["ref_ztxt"],
                                              sharded["truth"])
            state, metrics = fns.update(state, sharded["image"], sharded["tokens"], indices, jax.random.key(4))
            results[n] = {"indices": np.asarray(indices).tolist(), "loss": float(metrics["loss"]),
                          "selected": float(diagnostics["selected_learnability"])}
        json.dump(results, sys.stdout)
    """)
    results = run_on_four_cpu_devices(script)
    assert results["1"]["indices"] == results["4"]["indices"]
    assert len(set(results["1"]["indices"])) == configs.get_config("jest", smoke=True).batch_size
    assert results["1"]["loss"] == pytest.approx(results["4"]["loss"], rel=1e-5)
    assert results["1"]["selected"] == pytest.approx(results["4"]["selected"], rel=1e-4)


def test_off_diagonal_share_matches_a_dense_recount():
    from curation.trainer import selection

    rng = np.random.default_rng(1)

    def embeddings(t, b):
        z = rng.normal(size=(2, 48, 8)).astype(np.float32)
        z /= np.linalg.norm(z, axis=-1, keepdims=True)
        return selection.Embeddings(jnp.asarray(z[0]), jnp.asarray(z[1]), t, b)

    learner, reference = embeddings(12.0, -6.0), embeddings(9.0, -4.0)
    indices, traces = selection.joint_selection_trace(jax.random.key(0), learner, reference, n_select=16, n_chunks=4)
    dense = np.asarray(selection.pair_scores(learner, reference))  # [B, B]
    indices = np.asarray(indices)
    own, off = [], []
    for chunk in range(1, 4):
        before = indices[: 4 * chunk]
        for i in indices[4 * chunk : 4 * chunk + 4]:
            own.append(dense[i, i])
            off.append(dense[i, before].sum() + dense[before, i].sum())
    expected = np.abs(off).sum() / (np.abs(own).sum() + np.abs(off).sum())
    share = training_step.off_diagonal_share(
        traces, jnp.asarray(indices), selection.diagonal_scores(learner, reference), 4
    )
    assert float(share) == pytest.approx(expected, rel=1e-4) and 0 < expected < 1
    assert float(training_step.off_diagonal_share(traces, jnp.asarray(indices), jnp.zeros(48), 1)) == 0.0


def test_bucket_shares_count_each_bucket_among_the_examples_that_name_it():
    from curation.trainer import truth

    codes = [
        truth.bucket_code(m)
        for m in (
            {"difficulty": "hard", "frequency": "tail"},
            {"difficulty": "hard", "frequency": "head"},
            {"difficulty": "easy"},
            {},
            "not json",
        )
    ]
    assert truth.split_bucket(codes[0]) == (2, 2) and truth.split_bucket(codes[2]) == (0, truth.BUCKET_UNKNOWN)
    drawn = jnp.asarray(codes, jnp.int32)
    shares = {k: float(v) for k, v in training_step.bucket_shares(drawn[:2], drawn).items()}
    assert shares["selected/difficulty/hard"] == 1.0 and shares["selected/frequency/tail"] == 0.5
    assert shares["superbatch/difficulty/hard"] == pytest.approx(2 / 3) and shares["superbatch/difficulty/easy"] == (
        pytest.approx(1 / 3)
    )
    assert shares["superbatch/frequency/head"] == 0.5 and shares["superbatch/frequency/torso"] == 0.0
    unknown = training_step.bucket_shares(drawn[3:], drawn[3:])
    assert all(np.isnan(float(v)) for v in unknown.values()) and len(unknown) == 2 * 2 * 3


def test_metrics_rows_average_what_each_step_measured_and_leave_out_what_none_did():
    from curation.trainer.metrics import check_finite

    nan = float("nan")
    pending = [(1, {"loss": 1.0, "share": 0.2, "none": nan}), (2, {"loss": 3.0, "share": nan, "none": nan})]
    assert check_finite(pending) == {"loss": 2.0, "share": 0.2}
    with pytest.raises(FloatingPointError, match="step 2"):
        check_finite([(1, {"loss": 1.0}), (2, {"loss": nan})])
