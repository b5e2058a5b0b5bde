"""Deduplication benchmark: `python bench/dedup.py --corpus demo` (or emoji).

Plants copies of known relation into a corpus's web split, scores it with the corpus's benchmark reference, and
measures what `python -m pipelines.dedup` finds:

  recall per kind   the share of planted copies put in their source's group: exact byte copies; JPEG re-encodes at
                    quality 40-90; resizes to 50-90%; crops of up to 10% of each side's length; left-right mirrors;
                    brightness and contrast changes of up to 10%; each with its source's caption or another's;
                    and copies of evaluation images (any of those kinds) planted in the web split: the share the job
                    marks as leaks of the right evaluation image;
  false positives   the share of distinct source images (not planted, not a near-duplicate the generator made) that
                    the job puts in a group with another distinct image: overall, among the pairs of one concept,
                    and (demo corpus) among the pairs its generator does not make near copies (`distinguishable`);
  cost              the job's steady per-example time against the scoring job's on the same corpus of
                    --cost_size examples (steady = the difference of a small and a full run's examples over the
                    difference of their times; start-up = the small run's time less its examples at that rate).

Before the job runs, two brute-force tables (no job) show each signal's trade-off whole: every planted pair's and
every distinct pair's reference-embedding cosine at each threshold of THRESHOLDS, and the pixel similarity the job
uses (`pipelines/pixel_match.py`) at each of PIXEL_THRESHOLDS, among the pairs whose candidate vectors are close.
The job then runs at --threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ablations  # noqa: E402  (bench/ablations.py: the corpora and their references)
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import results  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from curation.shared import dedup_output, schema  # noqa: E402
from curation.shared.corpus import CorpusRecord  # noqa: E402
from curation.shared.corpus_readers import iter_corpus  # noqa: E402
from curation.shared.corpus_writers import open_shard_writer  # noqa: E402
from curation.shared.scored_set import open_scored  # noqa: E402
from curation.shared.thumbnails import from_bytes  # noqa: E402
from demo import emoji_corpus, make_corpus, scenes  # noqa: E402
from demo import run as demo  # noqa: E402
from pipelines import dedup, pixel_match, score  # noqa: E402

COMMAND = ".venv/bin/python bench/dedup.py"
KINDS = ("exact", "jpeg", "resize", "crop", "flip", "brightness", "contrast")
THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
PIXEL_THRESHOLDS = (0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98)
CONCEPT = {"demo": ("shape", "colour"), "emoji": ("name",)}  # what makes two images one concept


def transform(image: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """A copy of `image` of `kind` (see the module docstring), encoded as JPEG (PNG for exact pixels' kinds)."""
    if kind == "exact":
        return image
    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    width, height = pixels.size
    quality = 95
    if kind == "jpeg":
        quality = int(rng.integers(40, 91))
    elif kind == "resize":
        scale = rng.uniform(0.5, 0.9)
        pixels = pixels.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    elif kind == "crop":
        left, top, right, bottom = (rng.uniform(0, 0.05, 4) * [width, height, width, height]).round().astype(int)
        pixels = pixels.crop((left, top, width - right, height - bottom))
    elif kind == "flip":
        pixels = ImageOps.mirror(pixels)
    elif kind == "brightness":
        pixels = ImageEnhance.Brightness(pixels).enhance(rng.uniform(0.9, 1.1))
    elif kind == "contrast":
        pixels = ImageEnhance.Contrast(pixels).enhance(rng.uniform(0.9, 1.1))
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def concept(record: CorpusRecord, corpus: str) -> str:
    return "/".join(str(record.metadata.get(name)) for name in CONCEPT[corpus])


def plant(corpus_dir: str, out: str, corpus: str, sources: int, seed: int) -> dict:
    """Write `out`/planted.tar: for `sources` clean web images, one copy of each kind; and for as many evaluation
    images, one copy of a random kind. Returns the plan: planted key -> its kind, source key and whether the source
    is an evaluation image."""
    rng = np.random.default_rng(seed)
    web = [r for r in iter_corpus([f"{corpus_dir}/web/*.tar"], "wds") if isinstance(r, CorpusRecord)]
    clean = [r for r in web if r.metadata.get("truth") == "clean"]
    evaluation = [r for r in iter_corpus([f"{corpus_dir}/eval/*/*.tar"], "wds") if isinstance(r, CorpusRecord)]
    captions = [r.caption for r in clean]  # another caption: a valid one (a broken one would be dead-lettered)
    plan, copies = {}, []
    for index in rng.choice(len(clean), size=min(sources, len(clean)), replace=False):
        source = clean[int(index)]
        for kind in KINDS:
            key = f"plant-{kind}-{source.key}".replace("/", "_")
            caption = source.caption if rng.random() < 0.5 else captions[int(rng.integers(len(captions)))]
            copies.append(CorpusRecord(key, transform(source.image, kind, rng), caption, "", {"truth": "planted"}))
            plan[key] = {"kind": kind, "source": source.key, "eval": False}
    for index in rng.choice(len(evaluation), size=min(sources, len(evaluation)), replace=False):
        source = evaluation[int(index)]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        key = f"leak-{kind}-{source.key}".replace("/", "_")
        copies.append(CorpusRecord(key, transform(source.image, kind, rng), source.caption, "", {"truth": "planted"}))
        plan[key] = {"kind": kind, "source": source.key, "eval": True}
    os.makedirs(out, exist_ok=True)
    with open_shard_writer(os.path.join(out, "planted.tar"), "wds") as writer:
        for record in copies:
            writer.write(record)
    distinct = {  # a near copy the generator made (the demo counts it clean) is no distinct image either
        r.key: concept(r, corpus)
        for r in web
        if r.metadata.get("truth") not in ("near_duplicate", "repeat") and r.metadata.get("detail") != "near_copy"
    }
    degraded = {r.key for r in web if r.metadata.get("truth") == "degraded"}
    return {"plan": plan, "distinct": distinct, "scenes": scenes_of(corpus_dir, corpus, distinct, degraded)}


def scenes_of(corpus_dir: str, corpus: str, distinct: dict[str, str], degraded: set[str]) -> dict | None:
    """The demo's scene of each distinct, not degraded web image (a degraded one's pixels are not its scene's)."""
    if corpus != "demo":
        return None
    with open(os.path.join(corpus_dir, "_SPLITS.json")) as file:
        made = json.load(file)
    settings = make_corpus.CorpusSettings(made["seed"], made["image_size"], made["image_format"])
    index = {make_corpus.example_key("web", i): i for i in range(made["splits"]["web"]["count"])}
    found = {key: make_corpus.scene_of(settings, "web", index[key]) for key in distinct if key not in degraded}
    return {"image_size": settings.image_size, "scenes": found}


def distinguishable(planted: dict, first: str, second: str) -> bool:
    """Whether two demo images both have a scene and are no near copies by the generator's own measure
    (`scenes.near_copy`, which keeps every evaluation scene apart from the training ones)."""
    a, b = (planted["scenes"]["scenes"].get(key) for key in (first, second))
    return a is not None and b is not None and not scenes.near_copy(a, b, planted["scenes"]["image_size"])


def embeddings(scored_dir: str) -> tuple[list[str], np.ndarray]:
    """(keys, [n, d] unit image embeddings) of a scored output's rows (keys are unique in these corpora)."""
    tables = [
        pq.read_table(path, columns=[schema.KEY, schema.REF_IMAGE_EMBEDDING])
        for path in dedup.scored_files(open_scored(scored_dir))
    ]
    keys = [key for table in tables for key in table.column(schema.KEY).to_pylist()]
    matrix = np.concatenate([schema.embedding_matrix(t, schema.REF_IMAGE_EMBEDDING) for t in tables]).astype(np.float32)
    return keys, matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def threshold_table(planted: dict, web: tuple[list[str], np.ndarray], held: tuple[list[str], np.ndarray]) -> str:
    """Recall per kind and false positives at each threshold, from every pair's cosine (no job)."""
    keys, matrix = web
    row = {key: i for i, key in enumerate(keys)}
    eval_row = {key.rsplit(":", 1)[-1]: i for i, key in enumerate(held[0])}
    cosines = {kind: [] for kind in (*KINDS, "leak")}
    for key, entry in planted["plan"].items():
        source = held[1][eval_row[entry["source"]]] if entry["eval"] else matrix[row[entry["source"]]]
        cosines["leak" if entry["eval"] else entry["kind"]].append(float(matrix[row[key]] @ source))
    distinct = [key for key in planted["distinct"] if key in row]
    vectors = matrix[[row[key] for key in distinct]]
    concepts = np.array([planted["distinct"][key] for key in distinct])
    nearest, nearest_same = np.full(len(distinct), -1.0), np.full(len(distinct), -1.0)
    for start in range(0, len(distinct), 1024):  # each distinct image's most similar other one
        block = vectors[start : start + 1024] @ vectors.T
        for i in range(block.shape[0]):
            block[i, start + i] = -1.0
        nearest[start : start + 1024] = block.max(axis=1)
        same = concepts[start : start + 1024, None] == concepts[None, :]
        nearest_same[start : start + 1024] = np.where(same, block, -1.0).max(axis=1)
    return recall_table(THRESHOLDS, cosines, {"false positives": nearest, "among one concept": nearest_same})


def recall_table(thresholds, scores: dict[str, list], nearest: dict[str, np.ndarray]) -> str:
    """One row per threshold: the share of each kind's `scores` at or above it, then of each `nearest` array (each
    distinct image's best score against another image)."""
    lines = ["| threshold | " + " | ".join([*scores, *nearest]) + " |", "|---" * (len(scores) + len(nearest) + 1) + "|"]
    for threshold in thresholds:
        recall = [f"{np.mean(np.array(values) >= threshold):.3f}" for values in scores.values()]
        false = [f"{np.mean(values >= threshold):.4f}" for values in nearest.values()]
        lines.append(f"| {threshold} | " + " | ".join(recall + false) + " |")
    return "\n".join(lines)


def scored_thumbnails(scored_dir: str) -> dict[str, np.ndarray]:
    """key -> thumbnail of each scored row (the job's own input; keys are unique in these corpora)."""
    found = {}
    for path in dedup.scored_files(open_scored(scored_dir)):
        table = pq.read_table(path, columns=[schema.KEY, schema.IMAGE_THUMBNAIL])
        for key, data in zip(table.column(schema.KEY).to_pylist(), table.column(schema.IMAGE_THUMBNAIL).to_pylist()):
            if data is not None:
                found[key] = from_bytes(data)
    return found


def pixel_table(planted: dict, web: dict[str, np.ndarray], held: dict[str, np.ndarray]) -> str:
    """Recall per kind, false positives and false leaks at each threshold of `pixel_match.similarity`, among the
    pairs whose candidate vectors meet `pixel_match.CANDIDATE_COSINE` (no job; every pair's candidate cosine)."""
    floor = pixel_match.CANDIDATE_COSINE
    scores = {kind: [] for kind in (*KINDS, "leak")}
    for key, entry in planted["plan"].items():
        copy, source = web[key], (held if entry["eval"] else web)[entry["source"]]
        met = float(pixel_match.candidate_vector(copy) @ pixel_match.candidate_vector(source)) >= floor
        scores["leak" if entry["eval"] else entry["kind"]].append(pixel_match.similarity(copy, source) if met else -1.0)
    distinct = [key for key in planted["distinct"] if key in web]
    concepts = np.array([planted["distinct"][key] for key in distinct])
    stack = np.stack([web[key] for key in distinct])
    vectors = np.stack([pixel_match.candidate_vector(t) for t in stack])
    eval_stack = np.stack(list(held.values()))
    eval_vectors = np.stack([pixel_match.candidate_vector(t) for t in eval_stack])
    nearest, nearest_same, nearest_eval, nearest_far = (np.full(len(distinct), -1.0) for _ in range(4))
    candidates = 0
    for i in range(len(distinct)):  # both directions of each candidate pair: i's windows here, j's at j
        others = np.nonzero(vectors @ vectors[i] >= floor)[0]
        others = others[others != i]
        candidates += len(others)
        if len(others):
            found = pixel_match.best_matches(stack[i], stack[others])
            np.maximum.at(nearest, others, found)
            nearest[i] = max(nearest[i], found.max())
            same = concepts[others] == concepts[i]
            if same.any():
                np.maximum.at(nearest_same, others[same], found[same])
                nearest_same[i] = max(nearest_same[i], found[same].max())
            if planted["scenes"] is not None:
                far = np.array([distinguishable(planted, distinct[i], distinct[j]) for j in others], bool)
                if far.any():
                    np.maximum.at(nearest_far, others[far], found[far])
                    nearest_far[i] = max(nearest_far[i], found[far].max())
        close = np.nonzero(eval_vectors @ vectors[i] >= floor)[0]
        if len(close):
            nearest_eval[i] = pixel_match.similarities(stack[i], eval_stack[close]).max()
    columns = {"false positives": nearest, "among one concept": nearest_same}
    if planted["scenes"] is not None:  # only the images with a scene: those the measure covers
        columns["among distinguishable"] = nearest_far[[key in planted["scenes"]["scenes"] for key in distinct]]
    table = recall_table(PIXEL_THRESHOLDS, scores, {**columns, "false leaks": nearest_eval})
    pairs = candidates / len(distinct) / 2
    return f"Candidate pairs (candidate cosine ≥ {floor}): {pairs:.2f} per distinct image among them.\n\n{table}"


def job_table(planted: dict, output: str) -> str:
    """What the job found: recall per kind, leak recall, false positives per distinct source image."""
    manifest = dedup_output.read_dedup_manifest(output)
    rows = {}
    for entry in manifest.files:
        table = pq.read_table(os.path.join(output, entry.dedup)).to_pylist()
        rows.update({row["key"]: row for row in table})
    found = {kind: [] for kind in (*KINDS, "leak")}
    for key, entry in planted["plan"].items():
        row = rows[key]
        if entry["eval"]:
            found["leak"].append(row["reason"] == dedup_output.LEAK and row["eval_key"].endswith(f":{entry['source']}"))
        else:
            found[entry["kind"]].append(row["group"] == rows[entry["source"]]["group"])
    members: dict[int, list[str]] = {}
    for key, row in rows.items():
        if key in planted["distinct"]:
            members.setdefault(row["group"], []).append(key)
    wrong = {key for group in members.values() if len(group) > 1 for key in group}
    concepts = {group: Counter(planted["distinct"][key] for key in keys) for group, keys in members.items()}
    same = {key for group, keys in members.items() for key in keys if concepts[group][planted["distinct"][key]] > 1}
    shares = [len(wrong) / len(planted["distinct"]), len(same) / len(planted["distinct"])]
    names = ["false positives", "among one concept"]
    if planted["scenes"] is not None:
        with_scene = planted["scenes"]["scenes"]
        far = {
            key
            for group in members.values()
            for key in group
            if key in with_scene and any(distinguishable(planted, key, other) for other in group if other != key)
        }
        shares.append(len(far) / len(with_scene))
        names.append("among distinguishable")
    lines = ["| " + " | ".join([*found, *names]) + " |", "|---" * (len(found) + len(names)) + "|"]
    lines.append(
        "| "
        + " | ".join(f"{np.mean(values):.3f}" for values in found.values())
        + "".join(f" | {share:.4f}" for share in shares)
        + " |"
    )
    return "\n".join(lines) + f"\n\nCounts in the job's manifest: {json.dumps(dataclasses.asdict(manifest.counts))}."


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def cost(args, reference: str, maker, work: str) -> str:
    """Steady per-example seconds and start-up of the scoring job and the dedup job on one corpus, small and full."""
    corpus = os.path.join(work, "cost_corpus")
    if not os.path.exists(os.path.join(corpus, "_SPLITS.json")):
        maker(
            corpus,
            size=args.cost_size,
            curated_size=64,
            eval_size=64,
            seed=1,
            shard_size=1000,
            workers=min(2, os.cpu_count() or 1),
            overwrite=True,
        )
    shards = sorted(os.listdir(os.path.join(corpus, "web")))
    small = max(1, len(shards) // 10)
    times = {}
    for name, count in (("small", small), ("full", len(shards))):
        inputs = [f"--input={os.path.join(corpus, 'web', shard)}" for shard in shards[:count]]
        scored, output = os.path.join(work, f"cost_scored_{name}"), os.path.join(work, f"cost_dedup_{name}")
        for path in (scored, output):  # timed afresh (a scoring run into an earlier output would add a batch)
            shutil.rmtree(path, ignore_errors=True)
        times[("score", name)] = timed(score.run, [*inputs, f"--output={scored}", f"--reference={reference}"])
        times[("dedup", name)] = timed(dedup.run, [f"--scored={scored}", f"--output={output}"])
        times[("examples", name)] = open_scored(scored).scored
    lines = ["| job | steady ms per example | start-up s |", "|---|---|---|"]
    steady = {}
    for job in ("score", "dedup"):
        examples = times[("examples", "full")] - times[("examples", "small")]
        steady[job] = (times[(job, "full")] - times[(job, "small")]) / examples
        startup = times[(job, "small")] - steady[job] * times[("examples", "small")]
        lines.append(f"| {job} | {1000 * steady[job]:.3f} | {startup:.1f} |")
    return (
        "\n".join(lines)
        + f"\n\nThe dedup job costs {steady['dedup'] / steady['score']:.3f}x the scoring job's steady time per example "
        f"(goal ≤ 0.10), on {times[('examples', 'full')]} examples ({times[('examples', 'small')]} in the small run; "
        "the job at its default thresholds, without evaluation sets)."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="demo", choices=sorted(ablations.CORPORA))
    parser.add_argument("--sources", type=int, default=300, help="source images planted of each kind (300)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=dedup.NEAR_THRESHOLD,
        help=f"the job's near and leak threshold, a pixel similarity ({dedup.NEAR_THRESHOLD})",
    )
    parser.add_argument("--cost_size", type=int, default=50000, help="examples of the cost runs' corpus (50000)")
    parser.add_argument("--out", default="runs/bench_dedup")
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    spec = ablations.CORPORA[args.corpus]
    demo_args = demo.parse_args(
        ["--out", spec["out"], "--seed", str(spec["seed"])] + [f"--{name}={spec[name]}" for name in ablations.REFERENCE]
    )
    maker = emoji_corpus.write_corpus if spec.get("maker") == "emoji" else make_corpus.write_corpus
    corpus_dir, reference_workdir, _ = demo.prepare(demo_args, maker=maker)
    reference = os.path.join(reference_workdir, "model")
    work = os.path.join(args.out, args.corpus)
    planted = plant(corpus_dir, os.path.join(work, "planted"), args.corpus, args.sources, seed=0)
    scored, held = os.path.join(work, "scored"), os.path.join(work, "eval_scored")
    for path, inputs in (
        (scored, [f"{corpus_dir}/web/*.tar", f"{work}/planted/*.tar"]),
        (held, [f"{corpus_dir}/eval/*/*.tar"]),
    ):
        if not os.path.isdir(path):
            score.run([*(f"--input={pattern}" for pattern in inputs), f"--output={path}", f"--reference={reference}"])
    web_keys, web_matrix = embeddings(scored)
    eval_keys, eval_matrix = embeddings(held)
    table = threshold_table(planted, (web_keys, web_matrix), ([f"eval:{k}" for k in eval_keys], eval_matrix))
    pixels = pixel_table(planted, scored_thumbnails(scored), scored_thumbnails(held))
    output = os.path.join(work, f"dedup_{args.threshold}")
    if not os.path.exists(os.path.join(output, dedup_output.DEDUP_MANIFEST)):
        dedup.run(
            [
                f"--scored={scored}",
                f"--eval_scored={held}",
                f"--output={output}",
                f"--near_threshold={args.threshold}",
                f"--leak_threshold={args.threshold}",
            ]
        )
    found = job_table(planted, output)
    spent = cost(args, reference, maker, work)
    body = (
        f"{len(planted['plan'])} planted copies ({args.sources} source images × {len(KINDS)} kinds, and "
        f"{sum(e['eval'] for e in planted['plan'].values())} copies of evaluation images) in a web split of "
        f"{len(planted['distinct'])} distinct images, scored by the corpus's benchmark reference.\n\n"
        f"Every pair's embedding cosine, at each threshold (recall per kind; false positives: the share of distinct "
        f"images with another distinct image at or above it):\n\n{table}\n\n"
        "The same from the images' pixels, what the job compares (`pipelines/pixel_match.py`: the scored rows' "
        "16 × 16 thumbnails; a pair is a candidate when its coarse vectors' cosine reaches the candidate "
        "threshold, and is then judged by the windowed correlation, over both directions; false leaks: the share "
        f"of distinct web images with an evaluation image at or above the threshold):\n\n{pixels}\n\n"
        f"The job at threshold {args.threshold} (near and leak):\n\n{found}\n\nCost:\n\n{spent}"
    )
    results.publish(f"Deduplication ({args.corpus} corpus)", body.splitlines(), COMMAND, not args.no_write)


if __name__ == "__main__":
    main()
