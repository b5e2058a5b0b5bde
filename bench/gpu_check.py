"""Bench: the figures only an accelerator can give, in one short run (pure JAX: no TensorFlow, Beam or keras-hub).

    bash bench/gpu_check.sh --out /tmp/gpu_check          # on the GPU: about 5 min, start-up excluded
    bash bench/gpu_check.sh --cpu --out /tmp/gpu_check    # the reduced form `make test` runs (under a minute)

1. Selection at paper scale: joint learnability selection of b = 32,768 from B = 163,840 at d = 768 (16 chunks,
   learner float32, reference float16 embeddings): seconds (median of 3 after a warm-up), XLA's compiled memory and
   the device's peak memory. Run first, so that the device peak is the selection's own.
2. Dense B×B selection (the comparator of bench/selection_memory.py) for B doubling from B/16, as far as its
   compiled memory fits the device, timed likewise; at the smallest B it must pick the blocked selection's indices.
3. The bare forward of the b-size FlexiViT (ViT-B/16 image tower at 224 px, B text tower) in float32 and bfloat16:
   examples per second over a batch, image and text towers together.
4. A JEST step (learnability, joint, the project's own jitted parts) on batches held in memory, b growing 128,
   256, ... while a step stays under `--step_budget_s`, fits, and the check is inside `--time_limit_s`: scoring /
   selection / update seconds.

Writes `gpu_check.json` and `gpu_check.md` (a section for bench/RESULTS.md, naming the device) under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, not installed

from selection_memory import dense_select  # noqa: E402  (bench/, beside this script)

from curation.trainer import configs, training_step
from curation.trainer.selection import Embeddings, select  # noqa: E402
from models.two_towers import ModelConfig, TwoTower, init_params  # noqa: E402

GIB = 2**30
FORMS = {
    "gpu": dict(
        B=163840,
        b=32768,
        d=768,
        model="b",
        image_size=224,
        patch=16,
        forward_batch=512,
        step_b=128,
        max_step_b=2048,
        repeats=3,
    ),
    "cpu": dict(
        B=2560, b=512, d=64, model="mu", image_size=32, patch=4, forward_batch=32, step_b=16, max_step_b=32, repeats=1
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="the reduced form, for CPU (what make test runs)")
    parser.add_argument(
        "--step_budget_s",
        type=float,
        default=None,
        help="stop growing the JEST step when one takes longer (default 2 s on GPU, 1 s on CPU)",
    )
    parser.add_argument(
        "--time_limit_s",
        type=float,
        default=270.0,
        help="no larger JEST step is tried once the whole check has run this long",
    )
    parser.add_argument(
        "--memory_fraction",
        type=float,
        default=0.8,
        help="the share of device memory a dense program may take (compiled estimate)",
    )
    return parser.parse_args(argv)


def device_summary() -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "memory_bytes": stats.get("bytes_limit"),
    }


def peak_bytes() -> int | None:
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit_embeddings(n: int, d: int, dtype, seed: int) -> Embeddings:
    keys = jax.random.split(jax.random.key(seed), 2)

    def unit(key):
        x = jax.random.normal(key, (n, d), jnp.float32)
        return (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

    return Embeddings(unit(keys[0]), unit(keys[1]), jnp.float32(10.0), jnp.float32(-10.0))


def compiled_bytes(compiled) -> int | None:
    """XLA's estimate of a compiled program's device memory (temp, arguments, output); None where the backend
    gives none."""
    memory = compiled.memory_analysis()
    if isinstance(memory, (list, tuple)):  # one per device on some versions
        memory = memory[0] if memory else None
    if memory is None:
        return None
    return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)


def selection_rows(form: dict, memory_limit: int | None, fraction: float, repeats: int) -> list[dict]:
    key, n_chunks = jax.random.key(0), 16
    rows = []

    def run(kind: str, B: int) -> dict:
        b = B * form["b"] // form["B"]
        fn = (
            functools.partial(select, method="joint", score="learnability", n_select=b, n_chunks=n_chunks)
            if kind == "blocked"
            else functools.partial(dense_select, n_select=b, n_chunks=n_chunks)
        )
        learner = unit_embeddings(B, form["d"], jnp.float32, 1)
        reference = unit_embeddings(B, form["d"], jnp.float16, 2)
        compiled = jax.jit(fn).lower(key, learner, reference).compile()
        row = {"kind": kind, "B": B, "b": b, "d": form["d"], "compiled_bytes": compiled_bytes(compiled)}
        if None not in (memory_limit, row["compiled_bytes"]) and row["compiled_bytes"] > fraction * memory_limit:
            row["seconds"] = None
            return row
        row["seconds"] = timed(compiled, key, learner, reference, repeats=repeats)
        row["indices"] = np.asarray(compiled(key, learner, reference))
        row["device_peak_bytes"] = peak_bytes()
        return row

    def attempt(kind: str, B: int) -> dict:
        try:
            return run(kind, B)
        except Exception as error:  # XLA's RESOURCE_EXHAUSTED when the estimate was too kind
            return {
                "kind": kind,
                "B": B,
                "b": B * form["b"] // form["B"],
                "d": form["d"],
                "seconds": None,
                "error": str(error).splitlines()[0][:200],
            }

    rows.append(attempt("blocked", form["B"]))
    seconds = rows[-1]["seconds"]
    print(
        f"joint selection B={form['B']} -> b={form['b']} d={form['d']}: "
        + (f"{seconds:.3f} s" if seconds is not None else f"failed ({rows[-1].get('error')})"),
        flush=True,
    )
    B = form["B"] // 16
    smallest = run("blocked", B)
    while B <= form["B"]:
        row = attempt("dense", B)
        rows.append(row)
        print(
            f"dense B={B}: " + (f"{row['seconds']:.3f} s" if row["seconds"] is not None else "does not fit"), flush=True
        )
        if row["seconds"] is None:
            break
        if B == smallest["B"] and not np.array_equal(row["indices"], smallest["indices"]):
            raise SystemExit(f"dense and blocked selections differ at B={B}: the comparator is wrong")
        B *= 2
    for row in rows:
        row.pop("indices", None)
    return rows


def model_config(form: dict) -> ModelConfig:
    return ModelConfig(
        image_variant=form["model"],
        text_variant=form["model"],
        image_size=form["image_size"],
        patch_size=form["patch"],
        embed_dim=768 if form["model"] == "b" else 64,
        text_length=64,
        vocab_size=32000,
    )


def forward_rows(form: dict, repeats: int) -> list[dict]:
    config = model_config(form)
    model, params = TwoTower(config), init_params(config, jax.random.key(0))
    n = form["forward_batch"]
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        cast = jax.tree.map(lambda x: x.astype(dtype), params)
        images = jnp.zeros((n, config.image_size, config.image_size, 3), dtype)
        tokens = jnp.ones((n, config.text_length), jnp.int32)
        forward = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t)[:2])
        seconds = timed(forward, cast, images, tokens, repeats=repeats)
        rows.append({"dtype": jnp.dtype(dtype).name, "batch": n, "seconds": seconds, "examples_per_s": n / seconds})
        print(f"forward {rows[-1]['dtype']}: {rows[-1]['examples_per_s']:.0f} examples/s", flush=True)
    return rows


def step_rows(form: dict, budget_s: float, repeats: int, deadline: float) -> list[dict]:
    model_cfg = model_config(form)
    model = TwoTower(model_cfg)
    optimizer = optax.adamw(1e-4, weight_decay=1e-4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    update = functools.partial(training_step.train_step, model=model, optimizer=optimizer, loss_name="sigmoid")
    rows, b = [], form["step_b"]
    while True:
        config = dataclasses.replace(
            configs.get_config("jest"),
            batch_size=b,
            image_size=model_cfg.image_size,
            patch_size=model_cfg.patch_size,
            learner_diagnostics=False,
        )
        B = config.superbatch_size
        try:
            parts = training_step.make_jest_functions(config, model, update, mesh, 10.0, -10.0)
            params = init_params(model_cfg, jax.random.key(0))
            state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros([], jnp.int32)}
            # placed as the step's outputs are, so that the timed calls reuse the first call's compilation
            state = jax.device_put(state, replicated)
            images = jax.device_put(
                jax.random.normal(jax.random.key(1), (B, model_cfg.image_size, model_cfg.image_size, 3)), data
            )
            tokens = jax.device_put(
                jax.random.randint(jax.random.key(2), (B, model_cfg.text_length), 1, model_cfg.vocab_size), data
            )
            reference = unit_embeddings(B, model_cfg.embed_dim, jnp.float16, 3)
            truth = jnp.zeros([B], jnp.int32)  # hidden-truth codes, for the diagnostics: all "clean"
            split = {"scoring": [], "selection": [], "update": []}
            for step in range(repeats + 2):  # the first two compile (the second sees the donated state)
                rng = jax.random.fold_in(jax.random.key(4), step)
                start = time.perf_counter()
                learned = jax.block_until_ready(parts.embed(state["params"], images, tokens))
                scored = time.perf_counter()
                indices, _ = jax.block_until_ready(parts.choose(rng, learned, reference.zimg, reference.ztxt, truth))
                selected = time.perf_counter()
                state, metrics = jax.block_until_ready(parts.update(state, images, tokens, indices, rng))
                if step >= 2:
                    split["scoring"].append(scored - start)
                    split["selection"].append(selected - scored)
                    split["update"].append(time.perf_counter() - selected)
            if not np.isfinite(float(metrics["loss"])):
                raise SystemExit(f"the JEST step at b={b} gave a non-finite loss")
        except Exception as error:  # out of device memory: the previous size was the largest
            print(f"JEST step b={b}: stopped ({str(error).splitlines()[0][:120]})", flush=True)
            break
        row = {"b": b, "B": B, **{part: statistics.median(values) for part, values in split.items()}}
        row["step"] = row["scoring"] + row["selection"] + row["update"]
        rows.append(row)
        print(
            f"JEST step b={b} B={B}: {row['step']:.3f} s (scoring {row['scoring']:.3f}, selection "
            f"{row['selection']:.3f}, update {row['update']:.3f})",
            flush=True,
        )
        if row["step"] > budget_s or 2 * b > form["max_step_b"] or time.perf_counter() > deadline:
            break
        b *= 2
    return rows


def markdown(results: dict) -> str:
    device, form = results["device"], results["form"]
    lines = [
        f"Device: {device['device']} ({device['platform']}, {device['devices']} device(s)), jax {device['jax']}, "
        f"Python {device['python']}"
        + (f", {device['memory_bytes'] / GIB:.0f} GiB" if device["memory_bytes"] else "")
        + f"; form: {results['name']}.",
        "",
        "| selection | B | b | d | seconds | compiled memory | device peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["selection"]:
        seconds = f"{row['seconds']:.3f}" if row["seconds"] is not None else "does not fit"
        peak = row.get("device_peak_bytes")
        lines.append(
            f"| {row['kind']} | {row['B']:,} | {row['b']:,} | {row['d']} | {seconds} | "
            + (f"{row['compiled_bytes'] / GIB:.2f} GiB" if row.get("compiled_bytes") else "–")
            + " | "
            + (f"{peak / GIB:.2f} GiB" if peak else "–")
            + " |"
        )
    lines += [
        "",
        f"Bare forward, {form['model']}-size towers, {form['image_size']} px / patch {form['patch']}:",
        "",
        "| dtype | batch | examples / s |",
        "|---|---|---|",
    ]
    lines += [f"| {row['dtype']} | {row['batch']} | {row['examples_per_s']:,.0f} |" for row in results["forward"]]
    lines += [
        "",
        "JEST step (learnability, joint, B = 5b) on batches in memory, median seconds:",
        "",
        "| b | B | scoring | selection | update | step |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['b']:,} | {r['B']:,} | {r['scoring']:.3f} | {r['selection']:.3f} | {r['update']:.3f} | {r['step']:.3f} |"
        for r in results["steps"]
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    name = "cpu" if args.cpu else "gpu"
    form = FORMS[name]
    budget = args.step_budget_s if args.step_budget_s is not None else (1.0 if args.cpu else 2.0)
    os.makedirs(args.out, exist_ok=True)
    device = device_summary()
    print(f"gpu_check ({name} form) on {device['device']}, jax {device['jax']}", flush=True)
    started = time.perf_counter()
    results = {"name": name, "form": form, "device": device}
    results["selection"] = selection_rows(form, device["memory_bytes"], args.memory_fraction, form["repeats"])
    results["forward"] = forward_rows(form, form["repeats"])
    results["steps"] = step_rows(form, budget, form["repeats"], started + args.time_limit_s)
    results["seconds"] = time.perf_counter() - started
    with open(os.path.join(args.out, "gpu_check.json"), "w") as out:
        json.dump(results, out, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as out:
        out.write(markdown(results))
    print(markdown(results))
    print(f"{results['seconds']:.0f} s; written to {args.out}/gpu_check.md and gpu_check.json")


if __name__ == "__main__":
    main()
