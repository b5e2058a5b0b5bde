"""What a run trains on, beside the input pipeline: a corpus split or scored shards, and the tokenizer built from
their captions. `TrainingData.batches` is the stream the train loop reads."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator

import numpy as np

from curation.shared import dedup_output, schema, scored_set
from curation.shared.validation import ValidationOptions
from curation.trainer import configs, distributed, input_pipeline, run_files, scored_input
from models.tokenizer import ByteTokenizer, WordTokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)


def build_tokenizer(config: configs.TrainConfig, captions: Callable[[], Iterator[str]], workdir: str):
    """The byte tokenizer, or a word vocabulary of `captions()` (the training data's), saved in the workdir for
    resumes."""
    path = run_files.join(workdir, "tokenizer.json")
    if run_files.exists(path):
        return tokenizer_from_dict(run_files.read_json(path))
    if config.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    elif config.tokenizer == "words":
        tokenizer = WordTokenizer.build(captions(), max_vocab=config.max_vocab)
    else:
        raise ValueError(f"unknown tokenizer {config.tokenizer!r}; expected 'words' or 'bytes'")
    run_files.write_json(path, tokenizer.to_dict(), indent=None)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Where a run's examples come from: a corpus split, or scored shards (with reference embeddings)."""

    shards: list  # shard paths; scored Parquet shards; or scored_input.SidecarShard (corpus shard + its sidecar)
    format: str
    scored: scored_set.ScoredSet | None = None
    max_difficulty: float = float("inf")  # offline filtering: see scored_input.difficulty_threshold
    left_out: dict[str, np.ndarray] | None = None  # deduplication: scored file -> [rows] bool, True: never trained on

    @classmethod
    def open(
        cls, config: configs.TrainConfig, data_dir: str, scored_dir: str | None, dedup_dir: str | None = None
    ) -> "TrainingData":
        if dedup_dir is not None and scored_dir is None:
            raise ValueError("--dedup thins a scored set: pass --scored DIR too (the output it was made for)")
        if scored_dir is None:
            if config.needs_scores:
                raise ValueError(
                    f"config {config.name!r} selects with reference scores: pass --scored "
                    "(the output of python -m pipelines.score)"
                )
            shards, format = input_pipeline.split_shards(data_dir, config.split)
            return cls(shards, format)
        scored = scored_set.open_scored(scored_dir)
        if scored.scored == 0:
            raise ValueError(
                f"the scored batches under {scored_dir} hold no scored example (see their manifests' "
                "counts and dead letter): nothing to train on"
            )
        if scored.layout == "sidecar":
            shards = [
                scored_input.SidecarShard(corpus, sidecar, options.input_format, options.fields())
                for corpus, sidecar, options in scored.sidecar_pairs()
            ]
            if not shards:
                raise ValueError(f"the sidecar batches under {scored_dir} list no scored input shard")
        else:
            no_images = [m.batch_dir for m in scored.manifests if m.options.store_image == "none"]
            if no_images:
                raise ValueError(
                    f"scored batches {no_images} were written with --store_image=none: nothing to train "
                    "on (score with --output_layout sidecar to train from the corpus itself)"
                )
            shards = scored.shard_paths("parquet")
            if not shards:
                raise ValueError(f"no Parquet scored shards under {scored_dir} (score with --output_format parquet)")
        if config.selection != "none":
            from curation.trainer.training_step import selection_loss

            selection_loss(config, scored.reference.loss)  # refuses, before any work, a combination that cannot work
        left_out = None if dedup_dir is None else dedup_masks(dedup_dir, scored, shards)
        return cls(
            shards,
            "parquet",
            scored,
            scored_input.difficulty_threshold(shards, config.offline_keep, scored.reference.loss, left_out),
            left_out,
        )

    def captions(self) -> Iterator[str]:
        if self.scored is not None:
            for shard in self.shards:
                path = shard.sidecar if isinstance(shard, scored_input.SidecarShard) else shard
                captions = scored_set.read_scored_parquet(path, [schema.CAPTION]).column(schema.CAPTION).to_pylist()
                yield from (caption for caption in captions if caption is not None)
            return
        for shard in self.shards:
            for item in input_pipeline.read_shard(shard, self.format):
                caption = input_pipeline.record_caption(item)
                if caption is not None:
                    yield caption

    def validation(self) -> ValidationOptions | None:
        """The decode rules of the scoring runs whose images the trainer decodes again (the loosest, when batches
        were scored under different flags), so that nothing they scored is skipped; None: the default rules."""
        if self.scored is None:
            return None
        rules = [manifest.options.validation() for manifest in self.scored.manifests]
        return ValidationOptions(
            max(rule.max_image_pixels for rule in rules),
            min(rule.min_image_size for rule in rules),
            max(rule.max_caption_chars for rule in rules),
        )

    def check_processes(self, config: configs.TrainConfig, process_count: int) -> None:
        """Raises unless `process_count` processes can share the data: a super-batch that divides over them, and a
        shard of its own for each."""
        if config.superbatch_size % process_count:
            raise ValueError(
                f"the super-batch of {config.superbatch_size} examples does not divide over "
                f"{process_count} processes: choose a batch_size (and filter_ratio) that does"
            )
        distributed.host_shards(self.shards, 0, process_count)

    def batches(
        self, tokenizer, config: configs.TrainConfig, position, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict]:
        """This process's part of every super-batch, from `position` (its own) on, preprocessed as the learner
        declares: `config.superbatch_size / process_count` examples a batch, from its own shards
        (`distributed.host_shards`)."""
        self.check_processes(config, process_count)
        shards = distributed.host_shards(self.shards, process_index, process_count)
        common = dict(
            batch_size=config.superbatch_size // process_count,
            image_size=config.image_size,
            text_length=config.text_length,
            seed=config.seed,
            start=position,
            preprocessing=config.model_config(tokenizer.vocab_size).preprocessing(),
            validation=self.validation(),
            processes=config.input_processes,
            cache_bytes=config.decode_cache_mb * 2**20,
        )
        if self.scored is None:
            dataset = input_pipeline.make_dataset(shards, self.format, tokenizer, **common)
        else:
            dataset = scored_input.make_scored_dataset(
                shards,
                tokenizer,
                embed_dim=self.scored.embed_dim,
                max_difficulty=self.max_difficulty,
                loss_family=self.scored.reference.loss,
                left_out=self.left_out,
                **common,
            )
        return dataset.as_numpy_iterator()


def dedup_masks(dedup_dir: str, scored: scored_set.ScoredSet, shards: list) -> dict[str, np.ndarray]:
    """Scored file -> [rows] bool, True for a row the dedup output in `dedup_dir` leaves out (a duplicate that does not
    represent its group, or an evaluation leak). Raises ValueError in one line when it was made for another scored
    set, or when a file's rows do not line up with it."""
    try:
        dedup = dedup_output.open_dedup(dedup_dir, scored)
        masks = {}
        for shard in shards:
            path = shard.sidecar if isinstance(shard, scored_input.SidecarShard) else shard
            masks[path] = dedup.left_out(path, scored.manifests[0].output)
            rows = scored_set.read_scored_parquet(path, [schema.KEY]).num_rows
            if rows != len(masks[path]):
                raise dedup_output.DedupError(
                    f"the dedup output {dedup_dir} has {len(masks[path])} rows for {path}, which has {rows}: run "
                    "python -m pipelines.dedup again"
                )
    except dedup_output.DedupError as error:
        raise ValueError(str(error)) from None
    counts = dedup.manifest.counts
    log.info(
        "--dedup %s: leaving out %d of %d scored examples (%d exact and %d near-duplicates, %d evaluation leaks)",
        dedup_dir,
        int(sum(mask.sum() for mask in masks.values())),
        counts.examples,
        counts.removed_exact,
        counts.removed_near,
        counts.leaks,
    )
    return masks
