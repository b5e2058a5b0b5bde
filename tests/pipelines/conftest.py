import pytest

from demo.make_corpus import write_corpus
from demo.noise import NoiseRates

# Every broken kind often enough to show up in a small corpus, and every other noise kind too.
BROKEN_HEAVY = NoiseRates(
    misaligned=0.2,
    boilerplate=0.1,
    near_duplicate=0.05,
    degraded=0.1,
    truncated_image=0.05,
    non_image=0.06,
    empty_caption=0.04,
    long_caption=0.04,
    bad_utf8=0.04,
)


@pytest.fixture(scope="session")
def web_corpora(tmp_path_factory) -> dict[str, str]:
    """format -> a corpus of 120 web examples in 3 shards with every broken kind, in each input format."""
    root = tmp_path_factory.mktemp("web_corpora")
    corpora = {}
    for format in ("wds", "parquet", "tfrecord"):
        out = str(root / format)
        write_corpus(
            out,
            size=120,
            format=format,
            seed=5,
            noise=BROKEN_HEAVY,
            curated_size=8,
            eval_size=8,
            shard_size=40,
            image_size=32,
        )
        corpora[format] = out
    return corpora
