"""JEST in your own training loop: select learnable sub-batches from a scored set, with none of this project's trainer.

    .venv/bin/python docs/examples/own_training_loop.py --scored runs/demo/scored \
        --corpus 'runs/demo/corpus/web/*.tar' --steps 20

The scoring job (`python -m pipelines.score`) stored the reference's embeddings of every example it scored. Your
loader gives (key, image, caption); the scored set gives the reference's embeddings by key. Each step draws a
super-batch of B examples, embeds it with the learner (no gradient), picks b = (1 - f)·B of them by joint
learnability selection (`curation.trainer.selection`) and takes an optax step on those b.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from typing import Iterator, Sequence

import jax
import numpy as np
import optax

from curation.shared import schema, sidecars
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from curation.shared.manifest import Options
from curation.shared.scored_set import ScoredSet, open_scored, read_scored_parquet
from curation.shared.validation import prepare_image, training_caption
from curation.trainer import selection
from models.losses import sigmoid_loss
from models.preprocessing import ImagePreprocessing
from models.tokenizer import ByteTokenizer
from models.two_towers import ModelConfig, TwoTower, init_params

Embedding = tuple[np.ndarray, np.ndarray]  # the reference's (image, text) embeddings of one example, [d] float16


def reference_embeddings(scored: ScoredSet) -> dict[str, Embedding]:
    """key -> the reference's embeddings, for every example the scoring job scored (either output layout)."""
    columns = [schema.KEY, schema.REF_IMAGE_EMBEDDING, schema.REF_TEXT_EMBEDDING]
    found: dict[str, Embedding] = {}
    if scored.layout == "sidecar":  # one file per input shard; a dead-lettered item's row has null embeddings
        for _, path, _ in scored.sidecar_pairs():
            table = sidecars.read_sidecar(path, columns)
            zimg, present = schema.sidecar_embeddings(table, schema.REF_IMAGE_EMBEDDING)
            ztxt, _ = schema.sidecar_embeddings(table, schema.REF_TEXT_EMBEDDING)
            keys = table.column(schema.KEY).to_pylist()
            found.update({keys[i]: (zimg[i], ztxt[i]) for i in np.flatnonzero(present)})
    else:  # copied: scored Parquet shards, scored rows only
        for path in scored.shard_paths("parquet"):
            table = read_scored_parquet(path, columns)
            zimg = schema.embedding_matrix(table, schema.REF_IMAGE_EMBEDDING)  # [n, d]
            ztxt = schema.embedding_matrix(table, schema.REF_TEXT_EMBEDDING)  # [n, d]
            found.update(zip(table.column(schema.KEY).to_pylist(), zip(zimg, ztxt)))
    return found


def superbatches(
    corpus: str, options: Options, embeddings: dict[str, Embedding], size: int, config: ModelConfig
) -> Iterator[tuple[np.ndarray, ...]]:
    """Stands in for your loader: (images [B, S, S, 3], tokens [B, L], ref_zimg [B, d], ref_ztxt [B, d]) batches of
    the examples that have scores, read and decoded as the scoring job did (`options`: its flags, in the manifest)."""
    preprocessing, tokenizer, rules = ImagePreprocessing(config.image_size), ByteTokenizer(), options.validation()
    batch = []
    for record in iter_corpus(corpus, options.input_format, options.fields()):
        if not isinstance(record, CorpusRecord) or record.key not in embeddings:
            continue  # a read error, or an example the scoring job dead-lettered
        image, caption = prepare_image(record.image, preprocessing, rules), training_caption(record.caption, rules)
        if image is None or caption is None:
            continue
        batch.append((image, tokenizer.encode(caption, config.text_length), *embeddings[record.key]))
        if len(batch) == size:
            images, tokens, ref_zimg, ref_ztxt = (np.stack(column) for column in zip(*batch))
            yield images, tokens, ref_zimg.astype(np.float32), ref_ztxt.astype(np.float32)
            batch = []


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scored", required=True, help="output folder of python -m pipelines.score")
    parser.add_argument("--corpus", required=True, help="glob of the corpus shards that were scored")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16, help="the sub-batch b trained on")
    parser.add_argument("--filter_ratio", type=float, default=0.8, help="f: the super-batch is B = b / (1 - f)")
    parser.add_argument("--n_chunks", type=int, default=4, help="joint selection's chunks; must divide b")
    args = parser.parse_args(argv)

    # 1. The scored set: the reference's embeddings by key, its t*, bias* and loss family from the manifest.
    scored = open_scored(args.scored)
    reference_info = scored.reference
    embeddings = reference_embeddings(scored)
    superbatch_size = round(args.batch_size / (1 - args.filter_ratio))

    # 2. Your learner and optimizer: here a tiny dual encoder with random weights (any model giving L2-normalized
    #    image and text embeddings, a temperature and a bias will do; its width need not be the reference's).
    vocab_size = ByteTokenizer().vocab_size
    config = ModelConfig("mu", "mu", image_size=32, patch_size=8, embed_dim=32, text_length=16, vocab_size=vocab_size)
    model, optimizer = TwoTower(config), optax.adamw(1e-3)
    params = init_params(config, jax.random.key(0))
    opt_state = optimizer.init(params)

    # 3. Selection: the learner embeds the super-batch; learnability = learner loss - reference loss, per pair.
    @jax.jit
    def choose(rng, params, images, tokens, ref_zimg, ref_ztxt):
        zimg, ztxt, aux = model.apply({"params": params}, images, tokens)  # [B, d] each
        learner = selection.Embeddings(zimg, ztxt, aux["t"], aux["b"])
        reference = selection.Embeddings(ref_zimg, ref_ztxt, reference_info.temperature, reference_info.bias)
        options = dict(method="joint", score="learnability", n_select=args.batch_size, n_chunks=args.n_chunks)
        indices = selection.select(rng, learner, reference, loss=reference_info.loss, **options)  # [b]
        random = jax.random.permutation(jax.random.fold_in(rng, 1), len(images))[: args.batch_size]  # to compare
        learnability = functools.partial(selection.subbatch_score, learner, reference, loss=reference_info.loss)
        return indices, learnability(indices), learnability(random)

    # 4. The update: an ordinary step on the chosen sub-batch.
    @jax.jit
    def train_step(params, opt_state, images, tokens):
        def loss_fn(params):
            zimg, ztxt, aux = model.apply({"params": params}, images, tokens)
            return sigmoid_loss(zimg, ztxt, aux["t"], aux["b"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = superbatches(args.corpus, scored.manifests[-1].options, embeddings, superbatch_size, config)
    history = []
    for step, (images, tokens, ref_zimg, ref_ztxt) in enumerate(itertools.islice(batches, args.steps)):
        indices, selected, random = choose(jax.random.key(step), params, images, tokens, ref_zimg, ref_ztxt)
        picked = np.asarray(indices)
        params, opt_state, loss = train_step(params, opt_state, images[picked], tokens[picked])
        loss, selected, random = float(loss), float(selected), float(random)
        scores = {"selected_learnability": selected, "random_learnability": random}
        history.append({"step": step, "indices": picked, "loss": loss, **scores})
        print(
            f"step {step}: {len(picked)} of {superbatch_size} selected, loss {loss:.3f}, learnability of the "
            f"selected sub-batch {selected:.3f} against a random one's {random:.3f}"
        )
    return history


if __name__ == "__main__":
    main()
