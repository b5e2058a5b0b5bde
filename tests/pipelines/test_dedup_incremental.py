"""The dedup job's --incremental_from: a scored set that gained a batch is deduplicated against the earlier dedup
output, whose verdicts stand (a row kept there stays kept), and only pairs with a new row are compared."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from curation.shared import dedup_output
from curation.shared.scored_set import open_scored
from pipelines import dedup, pixel_match
from pipelines import dedup_stages as stages
from tests.pipelines.test_dedup import planted, run_dedup, run_score, verdicts  # noqa: F401


@pytest.fixture(scope="module")
def grown(planted, tiny_corpus, reference_checkpoint, tmp_path_factory):  # noqa: F811
    """A scored set of the planted web split's shard 0 deduplicated ("first"), then grown by a second batch (shard
    1: byte copies of shard 0's images and copies of evaluation images) and deduplicated again with --incremental_from
    ("second"), and afresh ("afresh")."""
    root = tmp_path_factory.mktemp("incremental")
    web = f"{planted['corpus']}/web"
    scored = run_score(f"{web}/00000.tar", str(root / "scored"), reference_checkpoint)
    evaluation = run_score(f"{tiny_corpus}/eval/zeroshot/*.tar", str(root / "eval"), reference_checkpoint)
    first = str(root / "first")
    run_dedup(scored, evaluation, first)
    run_score(f"{web}/*.tar", scored, reference_checkpoint, "--incremental")  # shard 1 only, into a new batch
    assert len(open_scored(scored).manifests) == 2
    second, afresh = str(root / "second"), str(root / "afresh")
    summary = run_dedup(scored, evaluation, second, f"--incremental_from={first}")
    run_dedup(scored, evaluation, afresh)
    return {"scored": scored, "eval": evaluation, "first": first, "second": second, "afresh": afresh, **summary}


def test_earlier_verdicts_stand_and_new_rows_join_earlier_groups(grown, planted):  # noqa: F811
    first, second = verdicts(grown["first"]), verdicts(grown["second"])
    assert set(first) < set(second)
    assert {name: second[name] for name in first} == first  # every earlier verdict, kept or not, unchanged
    new = {name: row for name, row in second.items() if name not in first}
    assert {shard for shard, _ in new} == {"00001.tar"}
    for (_, key), row in new.items():
        kind, source = planted["plan"].get(key, (None, None))
        if kind == "exact":  # a byte copy of a shard-0 image that the first output kept: that one stays kept
            assert first[("00000.tar", source)]["kept"]
            assert not row["kept"] and row["reason"] == dedup_output.EXACT
            assert row["group"] == first[("00000.tar", source)]["group"]
        elif kind == "leak":
            assert not row["kept"] and row["reason"] == dedup_output.LEAK
    # On this corpus no new row bridges two earlier groups, so deduplicating afresh finds the same.
    assert second == verdicts(grown["afresh"])
    manifest, again = (dedup_output.read_dedup_manifest(grown[name]) for name in ("second", "afresh"))
    assert manifest.counts == again.counts and manifest.counts.removed_exact >= 4
    assert manifest.settings["incremental_from"] == grown["first"] and again.settings["incremental_from"] is None
    earlier = dedup_output.read_dedup_manifest(grown["first"])
    assert [f.scored for f in manifest.files[: len(earlier.files)]] == [f.scored for f in earlier.files]
    batches = [os.path.basename(m.batch_dir) for m in open_scored(grown["scored"]).manifests]
    assert sorted(manifest.batches) == sorted(batches)


def test_a_new_row_joins_one_earlier_group_and_never_merges_two():
    """Earlier rows 1 and 2 in groups of their own; new rows 11 (near both) and 12 (near 11). Pinned, the earlier
    groups stay apart and the new rows join the smaller; unpinned, everything is one component."""
    edges = [(1, 11), (2, 11), (11, 12)]
    with test_pipeline.TestPipeline() as pipeline:
        pinned, _ = (
            pipeline
            | "Pinned" >> beam.Create(edges)
            | "C1"
            >> stages.Components(4, old_below=10, fixed=pipeline | "Fixed" >> beam.Create([(1, 1), (2, 2), (3, 1)]))
        )
        assert_that(pinned, equal_to([(1, 1), (2, 2), (11, 1), (12, 1)]), label="PinnedLabels")
        free, _ = pipeline | "Free" >> beam.Create(edges) | "C2" >> stages.Components(4)
        assert_that(free, equal_to([(1, 1), (2, 1), (11, 1), (12, 1)]), label="FreeLabels")


def test_two_earlier_rows_are_never_compared_again():
    image = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    members = [(i, image, (0,)) for i in (1, 2, 11)]
    # afresh, two pairs connect all three (the third is not compared); with 1 and 2 earlier, both their pairs with
    # 11 are compared, and theirs is not
    assert sorted(stages.near_pairs(0, members, 0.9)) == [(1, 2), (1, 11)]
    assert sorted(stages.near_pairs(0, members, 0.9, old_below=10)) == [(1, 11), (2, 11)]


def test_an_earlier_output_of_other_settings_or_another_scored_set_is_refused(grown, tmp_path, capsys):
    def refused(*extra: str) -> str:
        argv = [f"--scored={grown['scored']}", f"--eval_scored={grown['eval']}", f"--output={tmp_path / 'out'}"]
        with pytest.raises(SystemExit) as stopped:
            dedup.main([*argv, "--near_threshold=0.99", "--leak_threshold=0.99", *extra])
        assert stopped.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        return lines[0]

    def altered(name: str, **changes) -> str:
        folder = tmp_path / name
        folder.mkdir()
        values = json.loads(open(os.path.join(grown["first"], dedup_output.DEDUP_MANIFEST)).read())
        (folder / dedup_output.DEDUP_MANIFEST).write_text(json.dumps({**values, **changes}))
        return f"--incremental_from={folder}"

    assert "no dedup output" in refused(f"--incremental_from={tmp_path}")
    message = refused(f"--incremental_from={grown['first']}", "--bands=8")
    assert "was made with bands 16, this run has 8" in message and "without --incremental_from" in message
    assert "reference 000000000000" in refused(altered("reference", reference_fingerprint="0" * 64))
    values = json.loads(open(os.path.join(grown["first"], dedup_output.DEDUP_MANIFEST)).read())
    assert "batch-gone" in refused(altered("batches", batches=values["batches"] + ["batch-gone"]))
    files = [{**values["files"][0], "scored": "batch-x/gone.parquet"}]
    assert "no longer holds" in refused(altered("files", files=files))
    assert not os.path.exists(tmp_path / "out")


def _components(ids: list[int], pairs) -> set[frozenset[int]]:
    label = {i: i for i in ids}
    for _ in ids:
        for a, b in pairs:
            label[a] = label[b] = min(label[a], label[b])
    return {frozenset(i for i in ids if label[i] == root) for root in set(label.values())}


def test_a_bucket_of_many_copies_costs_about_one_comparison_a_row_and_connects_what_all_pairs_connect(monkeypatch):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(2)]
    # 40 copies of one image (brightness nudged), 10 of another, 5 images of their own
    members = [(i, np.clip(images[0].astype(int) + i % 3, 0, 255).astype(np.uint8), (0,)) for i in range(40)]
    members += [(100 + i, images[1], (0,)) for i in range(10)]
    members += [(200 + i, rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), (0,)) for i in range(5)]
    compared = []  # how many thumbnails each call judges
    original = pixel_match.best_matches
    monkeypatch.setattr(
        pixel_match, "best_matches", lambda t, others: compared.append(len(others)) or original(t, others)
    )
    found = list(stages.near_pairs(0, members, 0.9))
    ids = [member[0] for member in members]
    every = [
        (a[0], b[0])
        for k, a in enumerate(members)
        for b in members[k + 1 :]
        if pixel_match.similarity(a[1], b[1]) >= 0.9
    ]
    assert _components(ids, found) == _components(ids, every)
    assert {len(group) for group in _components(ids, found)} == {40, 10, 1}
    assert len(every) == 40 * 39 // 2 + 10 * 9 // 2 and len(found) == 39 + 9
    assert sum(compared) < 3 * len(members) < len(members) * (len(members) - 1) // 2
