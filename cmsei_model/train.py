"""The CMSEI training loop over the shards of a dataset folder.

Shape shorthand: B pairs per batch (one caption of each of B distinct images), k regions,
n words, d embedding size.

Per step: encode the B images and B captions, score the (B, B) similarity matrix, and
minimise the bidirectional hinge triplet loss (all negatives during the warm-up epochs,
the hardest negative afterwards) with Adam, step learning-rate decay and gradient-norm
clipping. After every epoch the model is validated (R@1, R@5, R@10 both ways and rSum),
`RUN/last.pt` is written, and `RUN/best.pt` when the validation rSum improved.
docs/training.md describes the options and the files of a run.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmsei_model import distributed
from cmsei_model.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cmsei_model.config import CMSEIConfig
from cmsei_model.data import (
    CachedReader,
    DataError,
    DistinctImageBatchSampler,
    GraphInfo,
    PairDataset,
    ReaderOptions,
    ShardReader,
    SplitPlan,
    build_pair_index,
    collate_pairs,
    image_table,
    inspect_graphs,
    load_vocabulary,
    plan_splits,
)
from cmsei_model.loss import ContrastiveLoss, use_hardest_negative
from cmsei_model.metrics_log import JSON_NAME, PLOT_NAME, CSV_NAME, MetricsLog
from cmsei_model.model import CMSEI
from cmsei_model.retrieval import ScoringOptions, autocast_context, encode_split, evaluate_encoded
from cmsei_model.semantic_graph import init_predicate_embeddings
from extractors.captions.vocab import Vocabulary
from pipeline.atomic import write_json
from pipeline.region_shards import RegionShard, shard_file_name

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUN_INFO = "run.json"
# Options that `--resume` takes from the command line; all others come from the checkpoint.
RESUME_OVERRIDES = ("data", "out", "epochs", "device", "precision", "threads", "loader_workers", "cache",
                    "progress", "max_steps_per_epoch", "resume", "overwrite")


@dataclass
class TrainOptions:
    """Options of one training run; `cmsei-train --help` describes each.

    `spatial_graph` and `semantic_graph` are None for "on when the graph shards exist".
    """

    data: Path
    out: Path
    train_split: str = "train"
    val_split: str = "val"
    holdout_fraction: float | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    lr_step: int = 15
    lr_gamma: float = 0.1
    grad_clip: float = 2.0
    margin: float = 0.2
    warmup_epochs: int = 1
    seed: int = 0
    loader_workers: int = 2
    cache: bool = False
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    val_max_images: int | None = 1000
    eval_batch_size: int = 128
    max_regions: int | None = None
    max_words: int | None = None
    max_steps_per_epoch: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    embed_size: int = 1024
    word_dim: int = 300
    relation_threshold: float = 0.0
    spatial_graph: bool | None = None
    semantic_graph: bool | None = None
    interaction: bool = True
    cross_level: bool = True
    baseline: bool = False
    gradient_checkpointing: bool = True
    pairs_per_chunk: int = 4096

    def __post_init__(self) -> None:
        self.data = Path(self.data).expanduser().resolve()
        self.out = Path(self.out).expanduser().resolve()
        positive = {"epochs": self.epochs, "lr_step": self.lr_step, "eval_batch_size": self.eval_batch_size,
                    "embed_size": self.embed_size, "word_dim": self.word_dim, "pairs_per_chunk": self.pairs_per_chunk}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 so that every pair has a negative, got {self.batch_size}")
        for name in ("max_regions", "max_words", "max_steps_per_epoch", "val_max_images", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not self.lr > 0 or not 0 < self.lr_gamma <= 1 or not self.grad_clip > 0:
            raise ValueError(
                f"need --lr > 0, 0 < --lr-gamma <= 1 and --grad-clip > 0, got {self.lr}, {self.lr_gamma}, "
                f"{self.grad_clip}"
            )
        if self.loader_workers < 0 or self.warmup_epochs < 0:
            raise ValueError("--loader-workers and --warmup-epochs must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the options as JSON types."""
        values = dataclasses.asdict(self)
        values["data"] = str(self.data)
        values["out"] = str(self.out)
        return values


@dataclass
class TrainSummary:
    """Result of `train`.

    Attributes:
        run_dir: the run folder.
        epochs_completed: epochs finished, counting those of a resumed run.
        best_epoch: epoch (from 1) with the best validation rSum, 0 before any.
        best_rsum: that rSum.
        last_row: the metrics of the last epoch run, empty when none ran.
        seconds: wall time of this call.
    """

    run_dir: Path
    epochs_completed: int
    best_epoch: int
    best_rsum: float
    last_row: dict[str, Any]
    seconds: float


@dataclass
class _Data:
    """The dataset folder content that training uses."""

    vocabulary: Vocabulary
    train_pairs: pd.DataFrame
    val_pairs: pd.DataFrame
    plan: SplitPlan
    graphs: GraphInfo
    feature_dim: int


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Return the autocast dtype (None for fp32) and whether a GradScaler is needed.

    "auto" is bf16 on a CUDA device that supports it, else fp16 on CUDA, and fp32 on the CPU.

    Raises:
        ValueError: for an unknown name, or fp16 on the CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return torch.float16, True


def build_config(options: TrainOptions, feature_dim: int, graphs: GraphInfo, data_root: Path) -> CMSEIConfig:
    """Turn the model options into a `CMSEIConfig`.

    Raises:
        DataError: when a graph component is requested explicitly but the dataset folder has
            no graph shards.
    """
    common = {
        "feature_dim": feature_dim,
        "embed_dim": options.embed_size,
        "word_dim": options.word_dim,
        "margin": options.margin,
        "warmup_epochs": options.warmup_epochs,
        "max_pairs_per_chunk": options.pairs_per_chunk,
        "gradient_checkpointing": options.gradient_checkpointing,
    }
    if options.baseline:
        return CMSEIConfig.baseline(**common)

    spatial = _graph_flag("spatial", options.spatial_graph, graphs, data_root)
    semantic = _graph_flag("semantic", options.semantic_graph, graphs, data_root)
    if not graphs.available and (options.spatial_graph is None or options.semantic_graph is None):
        logger.warning(
            "%s/graphs contains no graph shards, so the model runs without the spatial and semantic graphs; "
            "run `cmsei-prep graphs --data %s` to add them", data_root, data_root,
        )
    extra: dict[str, Any] = {
        "spatial_graph": spatial,
        "semantic_graph": semantic,
        "interaction": options.interaction,
        "cross_level": options.cross_level,
        "relation_threshold": options.relation_threshold,
    }
    if semantic:
        extra["num_predicates"] = len(graphs.predicate_names)
    return CMSEIConfig(**common, **extra)


def _graph_flag(kind: str, requested: bool | None, graphs: GraphInfo, data_root: Path) -> bool:
    if requested is None:
        return graphs.available
    if requested and not graphs.available:
        raise DataError(
            f"--{kind}-graph needs graph shards, but {data_root}/graphs contains none; run "
            f"`cmsei-prep graphs --data {data_root}` or pass --no-{kind}-graph"
        )
    return requested


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_training_data(options: TrainOptions) -> _Data:
    """Read the vocabulary, the pair index, the splits and the graph description."""
    vocabulary = load_vocabulary(options.data)
    pairs = build_pair_index(options.data)
    train_pairs, val_pairs, plan = plan_splits(pairs, options.train_split, options.val_split,
                                               options.holdout_fraction)
    graphs = inspect_graphs(options.data, sorted(set(pairs["region_shard"])))
    first_shard = options.data / "regions" / shard_file_name(int(pairs["region_shard"].iloc[0]))
    with RegionShard(first_shard) as shard:
        feature_dim = int(shard.attrs["feature_dim"])
    logger.info(
        "training on %d pairs of %d images, validating on %d pairs of %d images; vocabulary of %d words; "
        "graph shards %s", len(train_pairs), train_pairs["image_id"].nunique(), len(val_pairs),
        val_pairs["image_id"].nunique(), len(vocabulary), "found" if graphs.available else "absent",
    )
    return _Data(vocabulary, train_pairs, val_pairs, plan, graphs, feature_dim)


def train(options: TrainOptions) -> TrainSummary:
    """Train CMSEI as `options` describe; see the module docstring.

    Raises:
        DataError: when the dataset folder lacks what training needs.
        CheckpointError: when `--resume` finds no usable `last.pt`.
        FileExistsError: when the run folder contains a run and neither resume nor overwrite is set.
        ValueError: for invalid options.
    """
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    context = distributed.init_distributed(options.device)
    try:
        return _Trainer(options, context).run()
    finally:
        distributed.shutdown(context)


class _Trainer:
    """State of one training run; `run` executes it."""

    def __init__(self, options: TrainOptions, context: distributed.DistributedContext) -> None:
        self.options = options
        self.context = context
        self.device = context.device
        self.autocast_dtype, use_scaler = resolve_precision(options.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.checkpoint: dict[str, Any] | None = None
        self.start_epoch = 0
        self.step = 0
        self.best_rsum = float("-inf")
        self.best_epoch = 0

    def run(self) -> TrainSummary:
        started = time.perf_counter()
        self._prepare_run_dir()
        options = self.options
        data = load_training_data(options)
        config = self._model_config(data)

        seed_everything(options.seed)
        model = CMSEI(config, len(data.vocabulary))
        if config.semantic_graph and self.checkpoint is None:
            missing = init_predicate_embeddings(model, data.graphs.predicate_names, dict(data.vocabulary.items()))
            if missing:
                logger.info("predicates without a vocabulary word keep a random embedding: %s", missing)
        model.to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=options.lr_step, gamma=options.lr_gamma)
        metrics = self._restore(model, optimizer, scheduler)
        self._log_model(model, config)
        if self.context.is_main:
            self._write_run_info(data, config)

        reader = self._reader(data, config)
        train_loader = self._train_loader(reader, data)
        wrapped = distributed.wrap_model(model, self.context)
        criterion = ContrastiveLoss(config.margin)

        last_row: dict[str, Any] = {}
        for epoch in range(self.start_epoch, options.epochs):
            criterion.hardest_negative = use_hardest_negative(epoch, config.warmup_epochs)
            train_loader.batch_sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            stats = self._train_epoch(wrapped, train_loader, criterion, optimizer, epoch)
            scheduler.step()
            last_row = {"epoch": epoch + 1, "step": self.step, "lr": lr,
                        "hardest_negative": criterion.hardest_negative, **stats}
            if self.context.is_main:
                last_row.update(self._validate(model, reader, data))
                self._finish_epoch(model, optimizer, scheduler, data, config, metrics, last_row)
            distributed.barrier(self.context)

        reader.close()
        return TrainSummary(options.out, max(self.start_epoch, options.epochs), self.best_epoch, self.best_rsum,
                            last_row, time.perf_counter() - started)

    def _prepare_run_dir(self) -> None:
        options = self.options
        last = options.out / LAST
        if options.resume:
            self.checkpoint = load_checkpoint(last, map_location="cpu")
            self._apply_stored_options()
            return
        existing = [name for name in (LAST, BEST, JSON_NAME, CSV_NAME, PLOT_NAME, RUN_INFO)
                    if (options.out / name).exists()]
        if existing and not options.overwrite:
            raise FileExistsError(
                f"{options.out} already contains a run ({', '.join(existing)}); pass --resume to continue it "
                f"or --overwrite to start again"
            )
        distributed.barrier(self.context)
        if self.context.is_main:
            options.out.mkdir(parents=True, exist_ok=True)
            for name in existing:
                (options.out / name).unlink()
        distributed.barrier(self.context)

    def _apply_stored_options(self) -> None:
        """On resume, take every option except `RESUME_OVERRIDES` from the checkpoint."""
        stored = dict(self.checkpoint["options"])
        current = self.options.to_dict()
        changed = {name: (stored[name], current[name]) for name in stored
                   if name not in RESUME_OVERRIDES and name in current and stored[name] != current[name]}
        if changed:
            logger.warning("resuming with the checkpoint's settings, ignoring the command line for: %s",
                           {name: f"{new!r} (checkpoint {old!r})" for name, (old, new) in changed.items()})
        values = {name: stored[name] for name in stored if name in current and name not in RESUME_OVERRIDES}
        values.update({name: current[name] for name in RESUME_OVERRIDES})
        self.options = TrainOptions(**values)

    def _model_config(self, data: _Data) -> CMSEIConfig:
        if self.checkpoint is None:
            return build_config(self.options, data.feature_dim, data.graphs, self.options.data)
        stored_vocabulary = dict(self.checkpoint["vocabulary"])
        if stored_vocabulary != dict(data.vocabulary.items()):
            raise CheckpointError(
                f"{self.options.data}/captions/vocab.json differs from the vocabulary of the checkpoint; "
                f"resume on the dataset folder the run was started on"
            )
        plan = SplitPlan.from_dict(dict(self.checkpoint["splits"]))
        if plan != data.plan:
            raise CheckpointError(f"the splits now resolve to {data.plan}, the checkpoint used {plan}")
        return CMSEIConfig.from_dict(dict(self.checkpoint["config"]))

    def _restore(self, model: CMSEI, optimizer: torch.optim.Optimizer, scheduler: Any) -> MetricsLog:
        if self.checkpoint is None:
            return MetricsLog(self.options.out)
        state = self.checkpoint
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_rsum = float(state["best_rsum"])
        self.best_epoch = int(state["best_epoch"])
        logger.info("resuming after epoch %d (step %d, best validation rSum %.2f at epoch %d)",
                    self.start_epoch, self.step, self.best_rsum, self.best_epoch)
        if self.start_epoch >= self.options.epochs:
            logger.warning("the run already completed %d of --epochs %d; raise --epochs to train further",
                           self.start_epoch, self.options.epochs)
        self.checkpoint = None
        return MetricsLog.load(self.options.out, up_to_epoch=self.start_epoch)

    def _log_model(self, model: CMSEI, config: CMSEIConfig) -> None:
        parameters = sum(parameter.numel() for parameter in model.parameters())
        enabled = [name for name in ("box_geometry", "spatial_graph", "semantic_graph", "interaction", "cross_level")
                   if getattr(config, name)]
        logger.info("model: d=%d, %.2f M parameters, components %s, alignment %s; device %s, precision %s",
                    config.embed_dim, parameters / 1e6, enabled or "none", config.alignment, self.device,
                    self.autocast_dtype or "fp32")

    def _write_run_info(self, data: _Data, config: CMSEIConfig) -> None:
        write_json(self.options.out / RUN_INFO, {
            "options": self.options.to_dict(),
            "config": config.to_dict(),
            "splits": data.plan.to_dict(),
            "train_pairs": len(data.train_pairs),
            "train_images": int(data.train_pairs["image_id"].nunique()),
            "val_pairs": len(data.val_pairs),
            "val_images": int(data.val_pairs["image_id"].nunique()),
            "vocabulary_size": len(data.vocabulary),
            "predicate_names": list(data.graphs.predicate_names),
        })

    def _reader(self, data: _Data, config: CMSEIConfig) -> ShardReader | CachedReader:
        reader = ShardReader(self.options.data, data.vocabulary, ReaderOptions(
            spatial_graph=config.spatial_graph, semantic_graph=config.semantic_graph,
            max_regions=self.options.max_regions, max_words=self.options.max_words,
        ))
        if not self.options.cache:
            return reader
        pairs = pd.concat([data.train_pairs, self._val_pairs(data)], ignore_index=True)
        return CachedReader(reader, image_table(pairs), pairs)

    def _val_pairs(self, data: _Data) -> pd.DataFrame:
        limit = self.options.val_max_images
        if limit is None:
            return data.val_pairs
        first_images = data.val_pairs["image_id"].unique()[:limit]
        return data.val_pairs[data.val_pairs["image_id"].isin(first_images)].reset_index(drop=True)

    def _train_loader(self, reader: ShardReader | CachedReader, data: _Data) -> DataLoader:
        dataset = PairDataset(reader, data.train_pairs)
        sampler = DistinctImageBatchSampler(dataset.image_positions, self.options.batch_size, self.options.seed,
                                            self.context.rank, self.context.world_size)
        if len(sampler) == 0:
            raise DataError(
                f"the training split has {len(data.train_pairs)} pairs, too few for one batch per process; "
                f"lower --batch-size or add images"
            )
        workers = self.options.loader_workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.options.seed),
        )

    def _train_epoch(
        self, model: torch.nn.Module, loader: DataLoader, criterion: ContrastiveLoss,
        optimizer: torch.optim.Optimizer, epoch: int,
    ) -> dict[str, float]:
        model.train()
        total_batches = len(loader)
        if self.options.max_steps_per_epoch is not None:
            total_batches = min(total_batches, self.options.max_steps_per_epoch)
        progress = tqdm(total=total_batches, desc=f"epoch {epoch + 1}/{self.options.epochs}", unit="batch",
                        disable=not (self.options.progress and self.context.is_main), dynamic_ncols=True)
        loss_sum = 0.0
        pairs = 0
        batches = 0
        started = time.perf_counter()
        for batch in loader:
            if batches >= total_batches:
                break
            loss = self._train_step(model, batch.to(self.device, non_blocking=True), criterion, optimizer)
            loss_sum += loss
            pairs += len(batch)
            batches += 1
            rate = pairs / max(time.perf_counter() - started, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{loss / len(batch):.4f}", samples_per_s=f"{rate:.1f}")
        progress.close()
        seconds = time.perf_counter() - started
        return {
            "train_loss": distributed.all_reduce_mean(loss_sum / max(pairs, 1), self.context),
            "train_pairs": pairs * self.context.world_size,
            "samples_per_s": distributed.all_reduce_mean(pairs / max(seconds, 1e-9), self.context)
            * self.context.world_size,
            "train_seconds": seconds,
        }

    def _train_step(
        self, model: torch.nn.Module, batch: Any, criterion: ContrastiveLoss, optimizer: torch.optim.Optimizer
    ) -> float:
        """Run one optimiser step; return the batch loss (summed over the batch, as the loss defines it)."""
        with autocast_context(self.device, self.autocast_dtype):
            similarity = model(**batch.images.as_kwargs(), token_ids=batch.captions.token_ids,
                               lengths=batch.captions.lengths)
        loss = criterion(similarity.float(), batch.image_positions)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at step {self.step}; lower --lr or use --precision fp32"
            )

        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.options.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.step += 1
        return float(loss.detach())

    def _validate(self, model: CMSEI, reader: ShardReader | CachedReader, data: _Data) -> dict[str, float]:
        pairs = self._val_pairs(data)
        encoded = encode_split(model, reader, pairs, self.device, self.options.eval_batch_size,
                               self.options.loader_workers if not self.options.cache else 0, self.autocast_dtype)
        result = evaluate_encoded(model, encoded, "5k", scoring=ScoringOptions(autocast_dtype=self.autocast_dtype))
        metrics = {f"val_{name}": value for name, value in result["metrics"].items()}
        metrics["val_images"] = result["num_images"]
        metrics["val_captions"] = result["num_captions"]
        metrics["val_seconds"] = encoded.seconds + result["seconds"]
        return metrics

    def _finish_epoch(
        self, model: CMSEI, optimizer: torch.optim.Optimizer, scheduler: Any, data: _Data, config: CMSEIConfig,
        metrics: MetricsLog, row: dict[str, Any],
    ) -> None:
        epoch = int(row["epoch"])
        improved = row["val_rsum"] > self.best_rsum
        if improved:
            self.best_rsum = float(row["val_rsum"])
            self.best_epoch = epoch
        row["best_rsum"] = self.best_rsum
        metrics.append(row)
        logger.info("epoch %d: %s", epoch, {name: _rounded(value) for name, value in row.items()})

        payload = {
            "model": model.state_dict(),
            "config": config.to_dict(),
            "vocabulary": dict(data.vocabulary.items()),
            "epoch": epoch,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "best_epoch": self.best_epoch,
            "splits": data.plan.to_dict(),
            "options": self.options.to_dict(),
            "predicate_names": list(data.graphs.predicate_names),
            "metrics": {name: value for name, value in row.items() if isinstance(value, (int, float))},
        }
        if improved:
            save_checkpoint(self.options.out / BEST, payload)
            logger.info("validation rSum improved to %.2f; wrote %s", self.best_rsum, self.options.out / BEST)
        payload.update({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": capture_rng_state(),
        })
        save_checkpoint(self.options.out / LAST, payload)


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
