import jax
import pytest

from models import checkpoint
from models.tokenizer import ByteTokenizer
from models.two_towers import ModelConfig, init_params
from pipelines.make_corpus import NoiseRates, write_corpus

# Every broken kind often enough to show up in a small corpus, and every other noise kind too.
BROKEN_HEAVY = NoiseRates(misaligned=0.2, boilerplate=0.1, near_duplicate=0.05, degraded=0.1, truncated_image=0.05,
                          non_image=0.06, empty_caption=0.04, long_caption=0.04, bad_utf8=0.04)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory) -> str:
    """A 1-layer reference model (random weights, byte tokenizer) saved as the scoring job loads it."""
    path = str(tmp_path_factory.mktemp("reference") / "model")
    config = ModelConfig(image_variant="mu", text_variant="mu", image_size=32, patch_size=8, embed_dim=32,
                         text_length=32, vocab_size=ByteTokenizer().vocab_size)
    checkpoint.save(path, init_params(config, jax.random.key(0)), config, ByteTokenizer())
    return path


@pytest.fixture(scope="session")
def web_corpora(tmp_path_factory) -> dict[str, str]:
    """format -> a corpus of 120 web examples in 3 shards with every broken kind, in each input format."""
    root = tmp_path_factory.mktemp("web_corpora")
    corpora = {}
    for format in ("wds", "parquet", "tfrecord"):
        out = str(root / format)
        write_corpus(out, size=120, format=format, seed=5, noise=BROKEN_HEAVY, curated_size=8, eval_size=8,
                     shard_size=40, image_size=32)
        corpora[format] = out
    return corpora
