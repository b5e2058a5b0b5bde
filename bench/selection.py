"""Bench: blocked joint learnability selection at a paper-like super-batch vs the learner's forward on it.

    .venv/bin/python bench/selection.py            # B=20480 -> b=4096, d=256, 16 chunks; ~3-5 min on 2 CPU cores

Prints the compiled selection's memory analysis (against a B×B float32 matrix) and peak RSS, the median selection
time, and a table of the learner's forward time on the whole super-batch for several model sizes: measured
directly for the small demo size, extrapolated from a small sample for the 224 px sizes. Writes the results into
the "## Selection" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import results  # bench/results.py, beside this script

from curation.trainer.selection import Embeddings, select
from models.flops import example_forward_flops
from models.two_towers import ModelConfig, TwoTower, init_params

COMMAND = ".venv/bin/python bench/selection.py"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# (name, image size, patch size, text length, measure the whole super-batch directly?)
MODELS = [("xs", 32, 4, 16, True), ("ti", 224, 16, 64, False), ("s", 224, 16, 64, False), ("b", 224, 16, 64, False)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--superbatch_size", type=int, default=20480)
    parser.add_argument("--n_select", type=int, default=4096)
    parser.add_argument("--embed_dim", type=int, default=256)
    parser.add_argument("--n_chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is kept")
    parser.add_argument("--forward_batch", type=int, default=2048, help="batch of the direct (small model) forward")
    parser.add_argument("--sample", type=int, default=8, help="examples timed per 224 px model, then extrapolated")
    parser.add_argument("--models", default="xs,ti,s,b")
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    return parser.parse_args(argv)


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` (blocking on its result) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_embeddings(rng: np.random.Generator, n: int, d: int, dtype, t: float, b: float) -> Embeddings:
    def unit():
        x = rng.normal(size=(n, d)).astype(np.float32)
        return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype)

    return Embeddings(unit(), unit(), jnp.float32(t), jnp.float32(b))


def bench_selection(args) -> dict:
    """Compile, inspect and time joint learnability selection (reference embeddings float16, as stored)."""
    rng = np.random.default_rng(0)
    B, d = args.superbatch_size, args.embed_dim
    learner = random_embeddings(rng, B, d, jnp.float32, 10.0, -10.0)
    reference = random_embeddings(rng, B, d, jnp.float16, 10.0, -10.0)
    fn = jax.jit(
        functools.partial(select, method="joint", score="learnability", n_select=args.n_select, n_chunks=args.n_chunks)
    )
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = fn.lower(key, learner, reference).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds = timed(lambda: compiled(key, learner, reference), args.repeats)
    indices = np.asarray(compiled(key, learner, reference))
    assert len(np.unique(indices)) == args.n_select
    return dict(
        compile_s=compile_s,
        seconds=seconds,
        temp_bytes=memory.temp_size_in_bytes,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        square_bytes=B * B * 4,
        block_bytes=B * (args.n_select // args.n_chunks) * 4,
        peak_rss=peak_rss_bytes(),
        flops=4 * B * args.n_select * d * 2,  # learner + reference, S[:, C] + S[C, :]: four B×b×d matmuls
    )


def bench_forward(args, name: str, image_size: int, patch_size: int, text_length: int, whole: bool) -> dict:
    """Seconds for the learner's forward on the whole super-batch: measured, or per-example on a sample × B."""
    config = ModelConfig(
        image_variant=name,
        text_variant=name,
        image_size=image_size,
        patch_size=patch_size,
        text_length=text_length,
        embed_dim=args.embed_dim,
    )
    params = init_params(config, jax.random.key(1))
    forward = jax.jit(lambda params, images, tokens: TwoTower(config).apply({"params": params}, images, tokens)[:2])
    rng = np.random.default_rng(1)
    n = min(args.forward_batch, args.superbatch_size) if whole else args.sample
    images = jnp.asarray(rng.uniform(-1, 1, size=(n, image_size, image_size, 3)).astype(np.float32))
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(n, text_length)).astype(np.int32))
    if whole:  # every example of the super-batch, `n` at a time (the same batch again: timing only)
        n_batches = -(-args.superbatch_size // n)
        jax.block_until_ready(forward(params, images, tokens))
        start = time.perf_counter()
        for _ in range(n_batches):
            out = forward(params, images, tokens)
        jax.block_until_ready(out)
        seconds, how = time.perf_counter() - start, f"measured ({n_batches} batches of {n})"
    else:
        per_example = timed(lambda: forward(params, images, tokens), max(1, args.repeats - 1)) / n
        seconds, how = per_example * args.superbatch_size, f"extrapolated from {n} examples"
    coarse = 2 * patch_size
    return dict(
        name=name,
        resolution=f"{image_size} px / patch {patch_size}",
        seconds=seconds,
        how=how,
        flops=example_forward_flops(config) * args.superbatch_size,
        coarse_flops=example_forward_flops(config, coarse) * args.superbatch_size,
        coarse=coarse,
    )


def report(args, selection: dict, forwards: list[dict]) -> str:
    B, b, d, N = args.superbatch_size, args.n_select, args.embed_dim, args.n_chunks
    mib = lambda x: f"{x / 2**20:,.1f} MiB"  # noqa: E731
    lines = [
        f"Joint learnability selection, B={B:,} -> b={b:,} in {N} chunks of {b // N}, d={d} "
        f"(learner float32, reference float16 as stored).",
        "",
        f"- compiled memory: temp {mib(selection['temp_bytes'])}, arguments {mib(selection['argument_bytes'])}, "
        f"output {mib(selection['output_bytes'])}; one B×b/N float32 block is {mib(selection['block_bytes'])}, "
        f"a B×B float32 matrix would be {mib(selection['square_bytes'])} "
        f"(temp = {selection['temp_bytes'] / selection['square_bytes']:.1%} of it)",
        f"- peak RSS of the process after compiling and running the selection: {mib(selection['peak_rss'])} "
        f"(includes the JAX runtime and the inputs)",
        f"- selection: {selection['seconds']:.2f} s (median of {args.repeats} after warm-up; compile "
        f"{selection['compile_s']:.1f} s), {selection['flops'] / 1e9:,.0f} GFLOP (4·B·b·d·2)",
        "",
        "| learner | images | forward on B (s) | how | selection (s) | selection / forward, measured "
        "| selection / forward, FLOPs | FLOPs ratio at coarse patch (Flexi-JEST scoring) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in forwards:
        lines.append(
            f"| {f['name']} | {f['resolution']} | {f['seconds']:,.1f} | {f['how']} | {selection['seconds']:.2f} "
            f"| {selection['seconds'] / f['seconds']:.2%} | {selection['flops'] / f['flops']:.2%} "
            f"| {selection['flops'] / f['coarse_flops']:.2%} (patch {f['coarse']}) |"
        )
    lines += [
        "",
        "Goal: selection ≤ 5% of the learner's forward on the super-batch. The 224 px forward times are a per-example "
        "time on a small sample times B; the FLOPs columns use `models.flops.example_forward_flops` and 4·B·b·d·2 "
        "for the selection. Every row embeds into d={d}; selection FLOPs scale with d (the demo config's xs learner "
        "uses embed_dim 128, half of it). The compiled temp memory holds float32 copies of the embeddings "
        "(O(B·d)) and a chunk's B×b/N blocks, never B×B.".format(d=d),
    ]
    return "\n".join(lines)


def write_section(text: str, args) -> None:
    """Add or replace the "## Selection" section of bench/RESULTS.md."""
    results.write_section("Selection", text, COMMAND)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"devices: {jax.devices()}", flush=True)
    selection = bench_selection(args)
    print(
        f"selection compiled in {selection['compile_s']:.1f} s; temp {selection['temp_bytes']:,} bytes "
        f"vs B×B float32 {selection['square_bytes']:,} bytes; median {selection['seconds']:.2f} s",
        flush=True,
    )
    forwards = []
    for name, image_size, patch_size, text_length, whole in MODELS:
        if name in args.models.split(","):
            forwards.append(bench_forward(args, name, image_size, patch_size, text_length, whole))
            print(f"forward {name}: {forwards[-1]['seconds']:.1f} s for B ({forwards[-1]['how']})", flush=True)
    text = report(args, selection, forwards)
    print("\n" + text)
    if not args.no_write:
        write_section(text, args)
        print(f"\nwrote the Selection section of {RESULTS}")


if __name__ == "__main__":
    main()
