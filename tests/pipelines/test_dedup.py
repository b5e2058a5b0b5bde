"""The dedup job against a brute-force recount, on a corpus with planted copies of known relation: byte copies,
lossless re-encodes and mirror images of web images (in the same shard and in another), and copies of evaluation
images."""

import hashlib
import io
import json
import os
import posixpath

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps

from curation.shared import dedup_output, schema, thumbnails
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus, read_shard
from curation.shared.corpus_writers import open_shard_writer
from curation.shared.scored_set import open_scored
from pipelines import dedup, pixel_match, score
from tests.pipelines.test_portable_runner import JOB_TIMEOUT_S, bounded, portable_services  # noqa: F401

THRESHOLD = 0.99  # pixel similarity: a lossless re-encode has (about) the same pixels


def png(image: bytes, mirror: bool = False) -> bytes:
    buffer = io.BytesIO()
    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    (ImageOps.mirror(pixels) if mirror else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def clean_records(path: str) -> list[CorpusRecord]:
    return [r for r in read_shard(path, "wds") if isinstance(r, CorpusRecord) and r.metadata.get("truth") == "clean"]


@pytest.fixture(scope="module")
def planted(tiny_corpus, tmp_path_factory):
    """A two-shard web split: the tiny corpus's first two shards, plus byte copies of shard 0's images in shard 1,
    PNG re-encodes of them in shard 0, and byte and PNG copies of evaluation images; and what was planted."""
    root = tmp_path_factory.mktemp("planted")
    shards = sorted(os.path.join(tiny_corpus, "web", name) for name in os.listdir(os.path.join(tiny_corpus, "web")))
    items = [[r for r in read_shard(path, "wds") if isinstance(r, CorpusRecord)] for path in shards[:2]]
    sources = clean_records(shards[0])
    evaluation = clean_records(
        sorted(
            os.path.join(tiny_corpus, "eval", "zeroshot", name)
            for name in os.listdir(os.path.join(tiny_corpus, "eval", "zeroshot"))
        )[0]
    )
    plan = {}  # planted key -> (kind, the key of its source)

    def plant(shard: int, key: str, image: bytes, kind: str, source: str):
        items[shard].append(CorpusRecord(key, image, f"a planted {kind} copy", "", {"truth": "clean"}))
        plan[key] = (kind, source)

    for i, source in enumerate(sources[:4]):
        plant(1, f"exact-{i}", source.image, "exact", source.key)
    for i, source in enumerate(sources[4:7]):
        plant(0, f"png-{i}", png(source.image), "near", source.key)
    for i, source in enumerate(sources[7:9]):
        plant(1, f"mirror-{i}", png(source.image, mirror=True), "near", source.key)
    for i, source in enumerate(evaluation[:2]):
        plant(1, f"leak-exact-{i}", source.image, "leak", source.key)
    for i, source in enumerate(evaluation[2:4]):
        plant(0, f"leak-png-{i}", png(source.image), "leak", source.key)
    os.makedirs(root / "web")
    for index, records in enumerate(items):
        with open_shard_writer(str(root / "web" / f"{index:05d}.tar"), "wds") as writer:
            for record in records:
                writer.write(record)
    return {"corpus": str(root), "plan": plan}


def run_score(inputs: str, output: str, reference: str, *extra: str) -> str:
    score.run([f"--input={inputs}", f"--output={output}", f"--reference={reference}", "--min_image_size=4", *extra])
    return output


@pytest.fixture(scope="module")
def scored(planted, tiny_corpus, reference_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    web = f"{planted['corpus']}/web/*.tar"
    return {
        "reference": reference_checkpoint,
        "copied": run_score(web, str(root / "copied"), reference_checkpoint),
        "sidecar": run_score(web, str(root / "sidecar"), reference_checkpoint, "--output_layout=sidecar"),
        "eval": run_score(f"{tiny_corpus}/eval/zeroshot/*.tar", str(root / "eval"), reference_checkpoint),
    }


def run_dedup(scored_dir: str, eval_dir: str, output: str, *extra: str) -> dict:
    return dedup.run(
        [
            f"--scored={scored_dir}",
            f"--eval_scored={eval_dir}",
            f"--output={output}",
            f"--near_threshold={THRESHOLD}",
            f"--leak_threshold={THRESHOLD}",
            *extra,
        ]
    )


def read_table(path: str):
    """A Parquet file on any filesystem Beam knows (local, gs://)."""
    with FileSystems.open(path) as f:
        return pq.read_table(io.BytesIO(f.read()))


def row_names(scored_dir: str, path: str) -> list[tuple[str, str]]:
    """(input shard, key) of each row of a scored file: keys are unique only within an input shard."""
    table = read_table(path)
    keys = table.column(schema.KEY).to_pylist()
    if schema.SOURCE in table.column_names:  # a scored shard may hold rows of several input shards
        return [(posixpath.basename(s), k) for s, k in zip(table.column(schema.SOURCE).to_pylist(), keys)]
    shard = next(s for s, sidecar, _ in open_scored(scored_dir).sidecar_pairs() if sidecar == path)
    return [(posixpath.basename(shard), key) for key in keys]


def verdicts(output: str) -> dict[tuple[str, str], dict]:
    """(input shard, key) -> its dedup row, the group as the (input shard, key) of its representative."""
    manifest = dedup_output.read_dedup_manifest(output)
    names, rows = {}, {}
    for index, entry in enumerate(manifest.files):
        table = read_table(posixpath.join(output, entry.dedup)).to_pylist()
        scored_names = row_names(manifest.scored, posixpath.join(manifest.scored, entry.scored))
        for row, (name, values) in enumerate(zip(scored_names, table)):
            names[dedup_output.example_id(index, row)] = name
            rows[name] = values
    return {name: {**row, dedup_output.GROUP: names[row[dedup_output.GROUP]]} for name, row in rows.items()}


def thumbnails_of(scored_dir: str):
    """(name, sha, thumbnail) of each scored row of a scored output, in file order."""
    for path in dedup.scored_files(open_scored(scored_dir)):
        table = pq.read_table(path)
        pixels = table.column(schema.IMAGE_THUMBNAIL).to_pylist()
        shas = table.column(schema.IMAGE_SHA256).to_pylist()
        for name, sha, data in zip(row_names(scored_dir, path), shas, pixels):
            if data is not None:
                yield name, sha, thumbnails.from_bytes(data)


def similar(a: np.ndarray, b: np.ndarray) -> bool:
    """The job's rule, pair by pair: close candidate vectors, then pixel similarity ≥ THRESHOLD (neither near
    its threshold: a pair on it would be undecidable)."""
    cosine = float(pixel_match.candidate_vector(a) @ pixel_match.candidate_vector(b))
    if cosine < pixel_match.CANDIDATE_COSINE - 1e-4:
        return False
    similarity = pixel_match.similarity(a, b)
    assert abs(similarity - THRESHOLD) > 1e-4, "a pair sits on the threshold: undecidable"
    if similarity < THRESHOLD:  # not a near-duplicate, whichever side of the candidate threshold it lies
        return False
    assert abs(cosine - pixel_match.CANDIDATE_COSINE) > 1e-4, "a similar pair sits on the candidate threshold"
    return cosine >= pixel_match.CANDIDATE_COSINE


def brute_force(scored_dir: str, eval_dir: str) -> dict[tuple[str, str], dict]:
    """The same verdicts from every pair compared: components of (same hash or `similar`), each represented by its
    first row in file order."""
    rows = list(thumbnails_of(scored_dir))
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if rows[i][1] == rows[j][1] or similar(rows[i][2], rows[j][2]):
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    evaluation = [(sha, pixels) for _, sha, pixels in thumbnails_of(eval_dir)]
    eval_shas = {sha for sha, _ in evaluation}
    result = {}
    for i, (name, sha, pixels) in enumerate(rows):
        group = rows[find(i)][0]
        leak = sha in eval_shas or any(similar(pixels, other) for _, other in evaluation)
        result[name] = {"group": group, "kept": group == name and not leak, "leak": leak}
    return result


@pytest.fixture(scope="module")
def in_process(scored, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("dedup") / "in_process")
    summary = run_dedup(scored["copied"], scored["eval"], output)
    return output, summary


def test_groups_and_leaks_equal_a_brute_force_recount_and_catch_every_planted_copy(in_process, scored, planted):
    output, summary = in_process
    found = verdicts(output)
    expected = brute_force(scored["copied"], scored["eval"])
    assert {name: (row["group"], row["kept"], row["reason"] == dedup_output.LEAK) for name, row in found.items()} == {
        name: (row["group"], row["kept"], row["leak"]) for name, row in expected.items()
    }
    # Every planted copy is found for what it is: a leak left out, naming its evaluation image; a copy in its
    # source's group, which keeps one of the two (the first in file order), the other left out as a copy.
    for (shard, key), row in found.items():
        if key not in planted["plan"]:
            continue
        kind, source = planted["plan"][key]
        if kind == "leak":
            assert not row["kept"] and row["reason"] == dedup_output.LEAK and row["eval_key"].endswith(f":{source}")
            assert row["eval_similarity"] == pytest.approx(1.0, abs=1e-5)
            continue
        pair = [row, found[("00000.tar", source)]]
        assert pair[0]["group"] == pair[1]["group"] and sorted(r["kept"] for r in pair) == [False, True]
        left_out = next(r for r in pair if not r["kept"])
        assert left_out["reason"] == (dedup_output.EXACT if kind == "exact" else dedup_output.NEAR)
    manifest = dedup_output.read_dedup_manifest(output)
    counts = manifest.counts
    assert counts.removed_exact >= 4 and counts.removed_near >= 5 and counts.leaks >= 4 and manifest.converged
    assert summary["leaks"] == counts.leaks == sum(r["reason"] == dedup_output.LEAK for r in found.values())
    assert counts.examples == len(expected) and manifest.settings["eval_images"] > 0
    # Row-aligned with the scored files, readable with plain pyarrow.
    for entry in manifest.files:
        keys = pq.read_table(os.path.join(scored["copied"], entry.scored)).column(schema.KEY).to_pylist()
        assert pq.read_table(os.path.join(output, entry.dedup)).column("key").to_pylist() == keys


def test_two_workers_and_the_sidecar_layout_find_the_same(in_process, scored, tmp_path):
    found = verdicts(in_process[0])
    two = str(tmp_path / "two")
    run_dedup(
        scored["copied"],
        scored["eval"],
        two,
        "--runner=FnApiRunner",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )
    assert verdicts(two) == found
    sidecar = str(tmp_path / "sidecar")
    run_dedup(scored["sidecar"], scored["eval"], sidecar)
    by_sidecar = verdicts(sidecar)
    comparable = ("group", "kept", "reason", "eval_key")
    assert {name: [row[c] for c in comparable] for name, row in by_sidecar.items() if name in found} == {
        name: [row[c] for c in comparable] for name, row in found.items()
    }
    assert dedup_output.read_dedup_manifest(sidecar).layout == "sidecar"


def test_the_portable_runner_finds_the_same(portable_services, in_process, scored, tmp_path):  # noqa: F811
    output = str(tmp_path / "portable")
    bounded(
        JOB_TIMEOUT_S,
        "the dedup job on the portable runner",
        portable_services.give_up,
        run_dedup,
        scored["copied"],
        scored["eval"],
        output,
        *portable_services.flags,
    )
    assert verdicts(output) == verdicts(in_process[0])


def test_on_gcs_it_reads_and_writes_gs_paths_and_finds_the_same(gcs_bucket, planted, scored, in_process):
    scored_gs = run_score(f"{planted['corpus']}/web/*.tar", f"{gcs_bucket}/dedup/scored", scored["reference"])
    output = f"{gcs_bucket}/dedup/out"
    summary = run_dedup(scored_gs, scored["eval"], output)
    assert summary["leaks"] == dedup_output.read_dedup_manifest(output).counts.leaks > 0
    on_gcs, local = verdicts(output), verdicts(in_process[0])
    comparable = ("group", "kept", "reason", "eval_key")
    assert {name: [row[c] for c in comparable] for name, row in on_gcs.items()} == {
        name: [row[c] for c in comparable] for name, row in local.items()
    }


def test_evaluation_shards_read_by_the_job_give_the_same_leaks(in_process, scored, tiny_corpus, tmp_path):
    output = str(tmp_path / "eval_data")
    argv = [f"--scored={scored['copied']}", f"--output={output}", f"--near_threshold={THRESHOLD}"]
    dedup.run([*argv, f"--leak_threshold={THRESHOLD}", f"--eval_data={tiny_corpus}/eval/zeroshot/*.tar"])
    by_shards, by_scored = verdicts(output), verdicts(in_process[0])

    def leaks(found):  # the evaluation image's key, whichever way it was named
        named = {name: (row["eval_key"] or ":").rsplit(":", 1)[1] for name, row in found.items()}
        return {name: (row["kept"], row["reason"], named[name]) for name, row in found.items()}

    assert leaks(by_shards) == leaks(by_scored)
    manifest = dedup_output.read_dedup_manifest(output)
    records = [r for r in iter_corpus(f"{tiny_corpus}/eval/zeroshot/*.tar", "wds") if isinstance(r, CorpusRecord)]
    assert manifest.counts.leaks > 0 and manifest.settings["eval_images"] == len(records)


def test_mistakes_are_refused_in_one_line_before_any_work(scored, in_process, tmp_path, capsys):
    def refused(*argv, main=dedup.main) -> str:
        with pytest.raises(SystemExit) as stopped:
            main(list(argv))
        assert stopped.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        return lines[0]

    out = str(tmp_path / "out")
    message = refused(f"--scored={scored['copied']}", f"--output={out}", "--near_treshold=0.9")
    assert "--near_treshold" in message and "--near_threshold" in message
    assert "--scored" in refused(f"--output={out}")
    assert "already holds a dedup output" in refused(f"--scored={scored['copied']}", f"--output={in_process[0]}")
    old = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "before_v2", "scored_v1")
    assert "score the corpus again" in refused(f"--scored={old}", f"--output={out}")
    assert "no scored batch" in refused(f"--scored={tmp_path}", f"--output={out}")
    assert "--near_threshold" in refused(f"--scored={scored['copied']}", f"--output={out}", "--near_threshold=1.5")
    missing = f"--eval_data={tmp_path}/none/*.tar"
    assert "matches no file" in refused(f"--scored={scored['copied']}", f"--output={out}", missing)
    assert not os.path.exists(out)
    from curation import train

    trainer = ["--config=uniform", "--data=x", f"--workdir={out}", f"--dedup={in_process[0]}"]
    assert "pass --scored DIR too" in refused(*trainer, main=train.main)


def test_the_content_hash_is_the_sha256_of_the_stored_bytes(scored, planted):
    table = pq.read_table(open_scored(scored["copied"]).shard_paths())
    for image, sha in zip(table.column(schema.IMAGE).to_pylist(), table.column(schema.IMAGE_SHA256).to_pylist()):
        assert sha == hashlib.sha256(image).hexdigest()  # stored as_stored here: the same bytes
    manifest = json.loads(
        open(os.path.join(open_scored(scored["copied"]).manifests[0].batch_dir, "_MANIFEST.json")).read()
    )
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    # the thumbnail is of the decoded image: the same as one made from the stored bytes decoded whole
    for image, data in zip(table.column(schema.IMAGE).to_pylist(), table.column(schema.IMAGE_THUMBNAIL).to_pylist()):
        whole = thumbnails.make_thumbnail(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
        assert pixel_match.similarity(thumbnails.from_bytes(data), whole) > 0.99


def test_a_jest_run_with_dedup_never_reads_what_it_leaves_out(in_process, scored, tiny_corpus, tmp_path, monkeypatch):
    from curation.trainer import configs, scored_input
    from curation.trainer.loop import train
    from curation.trainer.workdir import check_workdir

    given = []  # (scored file, key) of every example the reader passed on
    original = scored_input.read_examples

    def recording(shard, loss_family="sigmoid", left_out=None):
        examples = original(shard, loss_family, left_out)
        given.extend((shard, example.key) for example in examples if example is not None)
        return examples

    monkeypatch.setattr(scored_input, "read_examples", recording)
    config = configs.get_config("jest", smoke=True)
    workdir = str(tmp_path / "jest")
    train(config, tiny_corpus, workdir, scored_dir=scored["copied"], dedup_dir=in_process[0])
    manifest = dedup_output.read_dedup_manifest(in_process[0])
    removed = set()
    for entry in manifest.files:
        table = pq.read_table(os.path.join(in_process[0], entry.dedup))
        path = os.path.join(scored["copied"], entry.scored)
        removed |= {
            (path, key)
            for key, kept in zip(table.column("key").to_pylist(), table.column("kept").to_pylist())
            if not kept
        }
    assert given and removed and not (set(given) & removed)
    assert len(removed) == manifest.counts.left_out
    # The run records its dedup output: resuming without it (or with another) is refused.
    with pytest.raises(ValueError, match="dedup"):
        check_workdir(config, workdir, scored["copied"], start_over=False)


def test_the_trainer_refuses_a_dedup_output_of_another_scored_set(in_process, scored, tiny_corpus, tmp_path):
    from curation.trainer import configs
    from curation.trainer.training_data import TrainingData

    config = configs.get_config("jest", smoke=True)
    with pytest.raises(ValueError, match="was made for the scored batches"):
        TrainingData.open(config, tiny_corpus, scored["sidecar"], in_process[0])
    with pytest.raises(ValueError, match="no dedup output"):
        TrainingData.open(config, tiny_corpus, scored["copied"], str(tmp_path))
    with pytest.raises(ValueError, match="--scored"):
        TrainingData.open(config, tiny_corpus, None, in_process[0])
    other = tmp_path / "other_reference"  # the same output, as if made with another reference
    other.mkdir()
    values = json.loads(open(os.path.join(in_process[0], dedup_output.DEDUP_MANIFEST)).read())
    (other / dedup_output.DEDUP_MANIFEST).write_text(json.dumps({**values, "reference_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="made with reference 000000000000"):
        TrainingData.open(config, tiny_corpus, scored["copied"], str(other))
