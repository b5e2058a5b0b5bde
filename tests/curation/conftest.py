import pytest

from pipelines.make_corpus import write_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small demo corpus (web 240 with every noise kind, curated 64, eval 48 + 48), in 3 web shards."""
    out = str(tmp_path_factory.mktemp("corpus") / "corpus")
    write_corpus(out, size=240, format="wds", seed=3, curated_size=64, eval_size=48, shard_size=100, image_size=32)
    return out


@pytest.fixture(scope="session")
def scored_tiny_corpus(tiny_corpus, reference_checkpoint, tmp_path_factory):
    """The tiny corpus's web split scored by the test reference model (Parquet shards with images)."""
    from pipelines import score

    output = str(tmp_path_factory.mktemp("scored") / "scored")
    score.run([f"--input={tiny_corpus}/web/*.tar", f"--output={output}", f"--reference_checkpoint={reference_checkpoint}",
               "--min_image_size=4"])
    return output
