"""Every knob of fastfilm, one dataclass per concern, paper values as defaults.

The CLI (fastfilm/cli.py) is derived from these dataclasses one to one: a field is a
flag, its `help` metadata is the flag's help, and `positional=True` makes it an
argument. Change a default here and the CLI follows.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastfilm.errors import UserError


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


def nested(cls: type, only: tuple[str, ...], **defaults):
    """A field holding a `cls` config inside another command's config. The fields named in
    `only` become flags of that command (help and choices as declared in `cls`), with
    `defaults` replacing cls's defaults; the other fields keep theirs (or `defaults`')."""
    return field(default_factory=lambda: cls(**defaults),
                 metadata={"nested": cls, "only": only, "defaults": defaults})


# ---------------------------------------------------------------- data

@dataclass
class GenerateConfig:
    """`fastfilm generate`: write a CLEVR v1.0-layout dataset made on this machine."""
    out: str = _f("", "output directory (CLEVR v1.0 layout)", positional=True)
    train_images: int = _f(1000, "images in the train split")
    val_images: int = _f(200, "images in the val split")
    test_images: int = _f(0, "images in the test split (written like CLEVR's: no answers, no programs)")
    questions_per_image: int = _f(10, "questions asked about each image (CLEVR has ~10)")
    image_width: int = _f(480, "rendered image width in pixels (CLEVR: 480)")
    image_height: int = _f(320, "rendered image height in pixels (CLEVR: 320)")
    min_objects: int = _f(3, "fewest objects per scene (CLEVR: 3)")
    max_objects: int = _f(10, "most objects per scene (CLEVR: 10)")
    cogent: str = _f("", "CLEVR-CoGenT condition A or B (shape/color palettes); empty for plain CLEVR",
                     choices=("", "A", "B"))
    families: str = _f("", "comma-separated question family names to keep, e.g. zero_hop_exist,zero_hop_query_color "
                       "(empty: all; an unknown name lists them all)")
    seed: int = _f(0, "random seed; the output is a pure function of the config and this seed")
    workers: int = _f(0, "worker processes (0: one per core)")
    min_pixels: int = _f(200, "fewest visible pixels per object at 480x320, scaled with the image area "
                         "(CLEVR: 200); scenes with a more hidden object are re-drawn")
    zoom: float = _f(1.0, "camera zoom (1: CLEVR's view); >1 shows a smaller table closer up, so objects are "
                     "larger in small images (the quickstart uses it)")
    supersample: int = _f(1, "rays per pixel side: 2 averages 2x2 rays for smooth edges (rendering time grows with the rays)")


@dataclass
class PreprocessConfig:
    """`fastfilm preprocess`: decode and resize every image once into a memory-mapped cache."""
    data: str = _f("", "CLEVR-layout directory (e.g. CLEVR_v1.0)", positional=True)
    cache: str = _f("", "cache directory (default: DATA/.fastfilm_cache/SIZE)")
    image_size: int = _f(224, "square side the images are resized to (paper: 224)")
    splits: str = _f("train,val", "comma-separated splits to cache (those present)")
    vocab: str = _f("", "existing vocab.json to use instead of building one from the train split")
    decoder: str = _f("auto", "image decoder: pillow; dali (DALI decodes and resizes); dali+pillow (DALI decodes, "
                      "Pillow resizes: Pillow's pixels); auto (the fastest measured on this kind of machine for "
                      "the size, said in one line; Pillow where none was measured)",
                      choices=("auto", "dali", "dali+pillow", "pillow"))
    device: str = _f("cpu", "DALI device: cpu, or gpu for a 'mixed' pipeline (JPEG decodes on the GPU, PNG on the CPU)",
                     choices=("cpu", "gpu"))
    skip_bad: bool = _f(False, "skip corrupt or missing images and malformed records (and count them) instead of stopping")
    workers: int = _f(0, "decode threads/processes (0: one per core)")
    force: bool = _f(False, "rebuild the cache even if one matching DATA, size and vocabulary exists")
    input: str = _f("pixels", "pixels: decode the images; features: a cache that reads the precomputed features of "
                    "DATA/features/ in place, no image decoded (docs/features.md)", choices=("pixels", "features"))


# ---------------------------------------------------------------- model

@dataclass
class ModelConfig:
    """The FiLM network and the Table 1 baselines. Defaults are the paper's best CLEVR model."""
    arch: str = _f("film", "film, cnn_gru (image + question concatenated, no FiLM) or question_only",
                   choices=("film", "cnn_gru", "question_only"))
    image_size: int = _f(224, "input side in pixels (paper: 224)")
    input: str = _f("pixels", "pixels (learned stem) or features (precomputed ResNet-101 conv4 maps)",
                    choices=("pixels", "features"))
    feature_channels: int = _f(1024, "channels of precomputed features (ResNet-101 conv4: 1024)")
    stem_layers: int = _f(4, "stride-2 4x4 conv layers in the raw-pixel stem (paper: 4, 224 -> 14)")
    channels: int = _f(128, "feature maps in the stem and every ResBlock (paper: 128)")
    num_blocks: int = _f(4, "FiLM-ed ResBlocks (paper: 4)")
    film_blocks: str = _f("all", "which ResBlocks get FiLM: 'all', 'none' or comma-separated indices ('0,2')")
    embed_dim: int = _f(200, "word embedding size (paper: 200)")
    rnn_dim: int = _f(4096, "GRU hidden units (paper: 4096)")
    classifier_proj: int = _f(512, "1x1 conv channels before the max-pool (paper: 512)")
    classifier_fc: int = _f(1024, "hidden units of the classifier MLP (paper: 1024)")
    gamma: str = _f("linear", "gamma parametrisation: linear (1 + delta), one (gamma := 1), sigmoid, tanh, exp",
                    choices=("linear", "one", "sigmoid", "tanh", "exp"))
    beta: str = _f("linear", "beta parametrisation: linear, or zero (beta := 0)", choices=("linear", "zero"))
    film_position: str = _f("after_bn", "where FiLM sits in a ResBlock: after_bn (paper), after_relu, "
                            "after_conv2, before_conv1, after_residual",
                            choices=("after_bn", "after_relu", "after_conv2", "before_conv1", "after_residual"))
    residual: bool = _f(True, "residual connection in each ResBlock")
    batchnorm: bool = _f(True, "batch norm in the stem, ResBlocks and classifier")
    coords: bool = _f(True, "concatenate x/y coordinate maps to the stem output, ResBlock inputs and classifier")
    conv2_kernel: int = _f(3, "kernel of each ResBlock's second conv (3 in the paper; 1 for the '1x1 only' ablation)")


# Named model presets. `paper` is the published model. `cpu` is sized for a 2-core CPU and
# was chosen by measured validation accuracy per minute on the quickstart's data (README,
# "Choosing the cpu preset", has the figures): larger inputs or more channels learned more
# per epoch but less per minute there.
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": dict(image_size=48, stem_layers=3, channels=32, embed_dim=64, rnn_dim=128,
                classifier_proj=128, classifier_fc=128),
    "tiny": dict(image_size=32, stem_layers=2, channels=16, num_blocks=2, embed_dim=16, rnn_dim=32,
                 classifier_proj=32, classifier_fc=32),
}


def resolve_preset(preset: str, device_type: str) -> str:
    """--preset as the preset that will be built: 'auto' is the paper's model on a GPU and the
    `cpu` preset on anything else, where the paper's model trains too slowly to learn within
    a session (README, "Choosing the cpu preset"); any other name stays as it is."""
    if preset != "auto":
        return preset
    return "paper" if device_type == "cuda" else "cpu"


def describe_preset(name: str) -> str:
    """A preset's size in words, from PRESETS: '48 px, 3-layer stem, 32 channels, GRU 128'."""
    c = model_config(name)
    return f"{c.image_size} px, {c.stem_layers}-layer stem, {c.channels} channels, {c.num_blocks} ResBlocks, GRU {c.rnn_dim}"


def model_config(preset: str = "paper", **overrides) -> ModelConfig:
    """The named preset with `overrides` (None values ignored) applied on top."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**values)


# ---------------------------------------------------------------- execution


@dataclass
class FastConfig:
    """The fast path's switches, shared by every command that runs a model. Each piece can be
    switched off to see what it buys (docs/fastpath.md); reference=True means the plain
    oracle and turns every other switch off. "auto" (None for the on/off switches) takes the
    value measured faster on this kind of machine (engine/options.py, DEFAULTS); an explicit
    value always wins."""
    reference: bool = _f(False, "run the plain reference model (the oracle) instead of the fast path")
    amp: str = _f("auto", "autocast dtype: bf16, fp16 (with a gradient scaler when training), off (fp32), or auto "
                  "(what is faster on this machine)", choices=("auto", "bf16", "fp16", "off"))
    compile: bool | None = _f(None, "torch.compile the model (fullgraph, static shapes) and the training step")
    fused: bool | None = _f(None, "use the fused BatchNorm+FiLM+ReLU+residual op in every ResBlock")
    channels_last: bool | None = _f(None, "channels_last activations in the visual pipeline")
    # Off by default (not auto): a graph is recorded per batch shape and holds its own memory
    # pool, and the path has not been measured on a GPU yet (docs/fastpath.md, "CUDA graphs").
    cuda_graphs: bool = _f(False, "replay each training step and inference batch as a CUDA graph, removing the "
                           "per-kernel launch cost (CUDA only: on a CPU it is off, with a note; the training step "
                           "needs the compiled fast path)")


def fast_config(cfg: FastConfig) -> FastConfig:
    """The FastConfig part of a command config that extends it."""
    return FastConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FastConfig)})


# ---------------------------------------------------------------- training

# The training recipe of each model preset: what --lr, --batch-size, --weight-decay,
# --group-questions, --lr-schedule and --warmup default to ("preset"). `paper` is the paper's
# constant Adam (and `tiny`, the tests' model, keeps it). `cpu` was chosen by time to accuracy
# (benchmarks/bench_learning.py; docs/learning.md has the tables): batch 128 trains ~1.36x the
# questions per second of 64 at two threads; per question, lr 1e-3 and 2e-3 at batch 128 were
# equal within run-to-run noise (+-4 points mid-curve), 2e-3 (64's 1e-3 scaled with the batch)
# led at the quickstart's length; linear decay and 8 questions per image lost.
_PAPER_RECIPE = dict(lr=3e-4, batch_size=64, weight_decay=1e-5, group_questions=1, lr_schedule="constant",
                     warmup="0")
TRAIN_PRESETS: dict[str, dict] = {
    "paper": _PAPER_RECIPE,
    "cpu": dict(lr=2e-3, batch_size=128, weight_decay=1e-5, group_questions=4, lr_schedule="constant", warmup="0"),
    "tiny": _PAPER_RECIPE,
}


def _by_preset(name: str) -> str:
    """'preset: paper 3e-4, cpu 1e-3, tiny 3e-4': a recipe field's value per preset, for --help."""
    def shown(v) -> str:
        return f"{v:.0e}".replace("e-0", "e-") if isinstance(v, float) and 0 < v < 0.01 else str(v)
    return "preset: " + ", ".join(f"{p} {shown(r[name])}" for p, r in TRAIN_PRESETS.items())


@dataclass
class TrainConfig(FastConfig):
    """`fastfilm train`: optimisation and run bookkeeping. Defaults are the paper's."""
    data: str = _f("", "CLEVR-layout directory or a cache built by `fastfilm preprocess`; with --resume it may be "
                   "left out (the run's own data is used) or given (it must hold the same questions)",
                   positional=True, optional=True)
    out: str = _f("runs/film", "run directory: checkpoints, metrics.jsonl, metrics.json; it must be new or empty "
                  "(see --resume and --overwrite), and is locked while a training writes into it")
    preset: str = _f("auto", "model preset: paper, cpu, tiny, or auto (paper on a GPU, cpu on a CPU, said in one "
                     "line)", choices=("auto", *PRESETS))
    epochs: int = _f(80, "maximum epochs (paper: at most 80)")
    batch_size: int | None = _f(None, "questions per step and per rank under torchrun (paper: 64). Batch norm "
                                "normalises over a step's questions, so it needs two: 1 is refused unless "
                                "--no-batchnorm, and with batch norm an epoch's last batch of a single question is "
                                "skipped (a different question each epoch: the order is reshuffled); "
                                + _by_preset("batch_size"))
    lr: float | None = _f(None, "Adam learning rate for the global batch, world size x batch (paper: 3e-4); "
                          + _by_preset("lr"))
    weight_decay: float | None = _f(None, "Adam weight decay (paper: 1e-5; the paper's author found it essential "
                                    "on CLEVR); " + _by_preset("weight_decay"))
    patience: int = _f(10, "early stopping: complete epochs without a better smoothed val accuracy (the mean of the "
                       "last --smooth-epochs epochs) before stopping (0: never)")
    smooth_epochs: int = _f(3, "early stopping watches the mean val accuracy of the last N complete epochs, not one "
                            "noisy epoch (1: single epochs); metrics.jsonl's val_spread is max - min over them")
    max_minutes: float = _f(0.0, "stop cleanly after this many minutes, then evaluate and write metrics (0: no limit)")
    seed: int = _f(0, "seed for weights, data order and dropout")
    resume: str = _f("", "run directory to continue exactly where it stopped (its own settings are kept; "
                     "--epochs, --max-minutes, --device, --log-every, --eval-batch-size apply)")
    overwrite: bool = _f(False, "train into an --out that holds files: first remove fastfilm's own there "
                         "(metrics, checkpoints, vocab.json; nothing else)")
    init_from: str = _f("", "fine-tune: start from this run's best weights (run directory or checkpoint file) and "
                        "its model; DATA's new words get new embedding rows (docs/finetuning.md)")
    train_only: str = _f("all", "with --init-from: train only the question encoder and FiLM generator "
                         "(film_generator, the paper's CLEVR-Humans recipe), only the question encoder (question), "
                         "or everything (all); frozen parts keep their batch norm statistics",
                         choices=("all", "film_generator", "question"))
    tensorboard: bool = _f(False, "also write the metrics.jsonl scalars to RUN/tensorboard (needs the tensorboard "
                           "package; metrics.jsonl stays the record)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    resident: str = _f("auto", "keep the training and validation images and question arrays in device memory and "
                       "build batches there: auto (on CUDA when they fit in half the free device memory), on, off",
                       choices=("auto", "on", "off"))
    eval_batch_size: int = _f(256, "questions per evaluation step")
    log_every: int = _f(20, "steps between progress-bar loss/accuracy updates (each costs a host sync)")
    max_train_questions: int = _f(0, "use only the first N training questions (0: all)")
    group_questions: int | None = _f(None, "keep up to this many questions about one image together in a batch, so "
                                     "the image goes through the stem once for all of them (1: independent "
                                     "questions, as in the paper; docs/fastpath.md); " + _by_preset("group_questions"))
    lr_schedule: str = _f("preset", "learning rate after the warm-up: constant, or cosine or linear decay to zero at "
                          "the end of the budget (--epochs, or --max-minutes if it ends first: the decay then follows "
                          "the clock); " + _by_preset("lr_schedule"),
                          choices=("preset", "constant", "cosine", "linear"))
    warmup: str = _f("preset", "linear learning-rate warm-up over N steps ('200') or a share of the budget ('5%%'); "
                     + _by_preset("warmup").replace("%", "%%"))
    bn_stats: str = _f("precise", "batch-norm statistics of every evaluated and saved model: precise (recomputed from "
                       "--precise-bn-batches training batches before each evaluation) or running (training's moving "
                       "average, as in the paper's code); recorded in the checkpoints",
                       choices=("precise", "running"))
    precise_bn_batches: int = _f(50, "training batches (of --batch-size) that --bn-stats precise averages")
    bn_momentum: float = _f(0.1, "momentum of the batch norms' running averages during training (torch: 0.1)")
    eval_gap_questions: int = _f(1024, "training questions whose eval-mode accuracy is compared with their train-mode "
                                 "accuracy after every epoch (eval_gap in metrics.jsonl; 0: not measured)")
    apex: bool = _f(False, "use NVIDIA apex FusedAdam if genuine apex is installed (else torch's fused Adam)")
    # Data-parallel training under torchrun (fastfilm/engine/distributed.py, docs/distributed.md).
    sync_bn: bool = _f(False, "under torchrun: batch norm statistics over the global batch instead of per rank "
                       "(turns the fused ResBlock op off: it keeps per-rank statistics)")
    dist_timeout_s: float = _f(600.0, "under torchrun: seconds a collective may wait before the job fails with an "
                               "error (a crashed or stalled rank); raise it if first-step compilation is slower")


def left_to_preset(cfg: TrainConfig) -> list[str]:
    """The recipe fields cfg leaves to its preset: None, or "preset" for the two string fields."""
    return [name for name in _PAPER_RECIPE if getattr(cfg, name) in (None, "preset")]


def train_recipe(cfg: TrainConfig) -> TrainConfig:
    """cfg with every recipe field left to the preset replaced by its --preset's value from
    TRAIN_PRESETS ('auto' and unknown: paper's)."""
    recipe = TRAIN_PRESETS.get(cfg.preset, TRAIN_PRESETS["paper"])
    return dataclasses.replace(cfg, **{k: recipe[k] for k in left_to_preset(cfg)})


def train_config_from(saved: dict) -> TrainConfig:
    """A TrainConfig from a checkpoint's `train_config` dict; fields this version does not
    know (a newer or an older fastfilm) are dropped, missing ones keep their defaults."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


@dataclass
class EvalConfig(FastConfig):
    """`fastfilm eval`: accuracy of a checkpoint overall, per question type and per family."""
    checkpoint: str = _f("", "checkpoint file (.pt or .safetensors) or run directory", positional=True)
    data: str = _f("", "CLEVR-layout directory or cache", positional=True)
    split: str = _f("val", "split to evaluate")
    json: bool = _f(False, "print the result as JSON")
    predictions: str = _f("", "write one predicted answer per line, in question order, to this file")
    batch_size: int = _f(256, "questions per evaluation step")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")


@dataclass
class AnswerConfig:
    """`fastfilm answer`: ask a trained model a question about any PNG/JPEG image."""
    checkpoint: str = _f("", "checkpoint file (.pt or .safetensors) or run directory", positional=True)
    image: str = _f("", "image file (PNG or JPEG, RGB or RGBA, any size)")
    question: str = _f("", "the question, in words")
    features_file: str = _f("", "for a model trained on precomputed features: the .npy or .h5 file holding the "
                            "image's feature (as in DATA/features/, docs/features.md)")
    feature_index: int = _f(-1, "the image's row in --features-file (-1: the number --image's file name ends in, "
                            "CLEVR_val_000123.png -> 123)")
    top: int = _f(5, "how many answers to show")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    # One question: the eager reference model answers it as fast as a compiled one would
    # start, so only the CUDA-graphs switch is offered (same flag and help as train and eval).
    fast: FastConfig = nested(FastConfig, only=("cuda_graphs",), reference=True, amp="off", compile=False,
                              fused=False, channels_last=False)


# Zero-hop questions of all five types: what a small model learns within minutes on a CPU.
# Compare Attribute is compare_size: its objects are named by color, which a 48x48 input
# shows well; compare_color names them by size, material and shape, which it shows poorly,
# and "same color" pairs are rare among 3-4 objects (README, "Quickstart", has the figures).
QUICKSTART_FAMILIES = ",".join([
    "zero_hop_exist", "zero_hop_count", "zero_hop_query_color", "zero_hop_query_shape", "zero_hop_query_material",
    "zero_hop_query_size", "compare_integer_greater", "compare_size"])


@dataclass
class QuickstartConfig:
    """`fastfilm quickstart`: generate a small dataset, train FiLM and the baselines, print the table.
    The generator and trainer flags below are theirs (`fastfilm generate/train --help`) with
    defaults sized for a few minutes on a 2-core CPU; --seed seeds the data as well."""
    out: str = _f("quickstart", "directory for the generated data, runs and results.json")
    film_minutes: float = _f(6.0, "training budget for FiLM")
    cnn_gru_minutes: float = _f(1.25, "training budget for the CNN+GRU baseline")
    question_only_minutes: float = _f(0.5, "training budget for the question-only baseline (no CNN: it learns fast)")
    max_total_minutes: float = _f(9.5, "FiLM's budget is cut so that the whole quickstart ends within this many "
                                  "minutes even when data generation or the baselines ran slow (0: no limit)")
    # Small images seen at 48x48 by the cpu preset, zoomed so that objects stay several pixels wide.
    generate: GenerateConfig = nested(
        GenerateConfig, only=("train_images", "val_images", "questions_per_image", "image_width", "image_height",
                              "min_objects", "max_objects", "zoom", "families"),
        train_images=4000, val_images=300, image_width=96, image_height=64, max_objects=4, zoom=1.9,
        families=QUICKSTART_FAMILIES)
    # The cpu preset's training recipe (TRAIN_PRESETS: chosen by time to accuracy); compile is
    # off because its one-off cost exceeds what it saves in a few minutes (docs/fastpath.md).
    train: TrainConfig = nested(
        TrainConfig, only=("preset", "epochs", "batch_size", "group_questions", "lr", "weight_decay", "lr_schedule",
                           "warmup", "seed", "overwrite", "reference", "amp", "compile", "fused", "channels_last"),
        preset="cpu", epochs=100, patience=0, compile=False)


# ---------------------------------------------------------------- analysis


@dataclass
class AnalyzeConfig:
    """`fastfilm analyze`: the paper's analyses of a trained FiLM run on one split: gamma/beta
    histograms, a 2-D embedding of each question's FiLM parameters, test-time ablations, and
    accuracy by question and program length. Writes PNG figures and analysis.json."""
    run: str = _f("", "run directory or checkpoint file (.pt or .safetensors) of a FiLM model", positional=True)
    data: str = _f("", "CLEVR-layout directory or cache", positional=True)
    split: str = _f("val", "split to analyse")
    out: str = _f("", "directory for the figures and analysis.json (default: RUN/analysis_SPLIT)")
    max_questions: int = _f(0, "analyse only the split's first N questions (0: all)")
    ablations: bool = _f(True, "run the test-time ablations (one pass over the split each)")
    noise: str = _f("0.1,0.5,1,2", "comma-separated standard deviations of the Gaussian noise added to gamma, "
                    "then to beta, one ablation each (empty: none)")
    near_zero: float = _f(0.1, "|gamma| below this counts as near zero (a feature map nearly shut off)")
    bins: int = _f(60, "histogram bins per block")
    embedding: str = _f("auto", "2-D embedding of each question's (gamma, beta): tsne (needs scikit-learn), "
                        "pca, or auto (tsne when scikit-learn is installed)", choices=("auto", "tsne", "pca"))
    embed_points: int = _f(2000, "questions in the embedding: a seeded sample when the split has more (0: all)")
    seed: int = _f(0, "seed of the noise ablations and of the embedding's sample")
    batch_size: int = _f(256, "questions per forward pass")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    # The model runs eagerly (hooks observe and replace gamma and beta), so compile is not offered.
    fast: FastConfig = nested(FastConfig, only=("reference", "amp", "fused", "channels_last"), compile=False)


@dataclass
class PlotConfig:
    """`fastfilm plot`: learning curves of one or more runs from their metrics.jsonl, overlaid:
    train/val accuracy, train loss, questions/s and per-type val accuracy per epoch."""
    runs: tuple[str, ...] = _f((), "run directories (each with the metrics.jsonl `fastfilm train` writes)",
                               positional=True, nargs="+", type=str)
    out: str = _f("curves.png", "PNG file to write")

    def __post_init__(self) -> None:
        # One run may be given as a plain string (Python callers); the CLI gives a list.
        self.runs = (self.runs,) if isinstance(self.runs, str) else tuple(self.runs)


# ---------------------------------------------------------------- validation


def _need(ok: bool, flag: str, allowed: str, value) -> None:
    if not ok:
        raise UserError(f"--{flag.replace('_', '-')} {value!r}: {allowed}")


def validate(cfg) -> None:
    """Refuse impossible values before any work, naming the flag (UserError)."""
    def positive(name: str, zero_ok: bool = False) -> None:
        if hasattr(cfg, name) and getattr(cfg, name) is not None:  # None: the preset's value
            v = getattr(cfg, name)
            ok = v >= 0 if zero_ok else v > 0
            _need(isinstance(v, (int, float)) and math.isfinite(v) and ok, name,
                  "must be a finite number " + (">= 0" if zero_ok else "> 0"), v)

    for name in ("epochs", "batch_size", "eval_batch_size", "lr", "log_every", "group_questions", "top",
                 "dist_timeout_s"):
        positive(name)
    for name in ("weight_decay", "patience", "max_minutes", "max_train_questions", "film_minutes",
                 "cnn_gru_minutes", "question_only_minutes", "max_total_minutes", "precise_bn_batches",
                 "eval_gap_questions"):
        positive(name, zero_ok=True)
    positive("smooth_epochs")
    if isinstance(cfg, TrainConfig):
        _need(0 < cfg.bn_momentum <= 1, "bn_momentum", "must be in (0, 1]", cfg.bn_momentum)
        if cfg.warmup != "preset":
            try:
                parse_warmup(cfg.warmup)
            except ValueError as e:
                raise UserError(f"--warmup {cfg.warmup!r}: {e}") from None
    if isinstance(cfg, ModelConfig):
        from_blocks = cfg.film_blocks
        try:
            parse_film_blocks(from_blocks, cfg.num_blocks)
        except ValueError as e:
            raise UserError(f"--film-blocks {from_blocks!r}: {e}") from None
        for name in ("image_size", "stem_layers", "channels", "num_blocks", "embed_dim", "rnn_dim",
                     "classifier_proj", "classifier_fc", "conv2_kernel", "feature_channels"):
            positive(name)
        _need(cfg.conv2_kernel % 2 == 1, "conv2_kernel", "must be odd (the output keeps its size)", cfg.conv2_kernel)
    if isinstance(cfg, TrainConfig) and cfg.train_only != "all" and not cfg.init_from:
        raise UserError(f"--train-only {cfg.train_only}: needs --init-from RUN (it freezes the rest of a trained model)")
    if isinstance(cfg, TrainConfig) and cfg.resume and cfg.overwrite:
        raise UserError(f"--resume {cfg.resume} continues a run and --overwrite starts one again: give one of them")
    for f in dataclasses.fields(cfg):
        if "nested" in f.metadata:
            validate(getattr(cfg, f.name))


def validate_training(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """What `fastfilm train` refuses beyond validate(): no data to train on, and a batch of
    one question for a model with batch norm, which normalises each unit over the questions
    of a step: over one question it outputs a constant, and the model would learn nothing."""
    if not cfg.data and not cfg.resume:
        raise UserError("give DATA (a CLEVR-layout directory or a cache), or --resume RUN to continue a run")
    if train_recipe(cfg).batch_size == 1 and model_cfg.batchnorm and not cfg.resume:
        raise UserError("--batch-size 1: batch norm normalises each unit over the questions of a step and cannot "
                        "train on one; use --batch-size 2 or more (the paper: 64), or --no-batchnorm")


def parse_film_blocks(spec: str, num_blocks: int) -> list[bool]:
    """'all' | 'none' | '0,2' -> which ResBlocks are FiLM-ed ([num_blocks] bools). ValueError otherwise."""
    if spec == "all":
        return [True] * num_blocks
    if spec in ("none", ""):
        return [False] * num_blocks
    try:
        chosen = {int(s) for s in spec.split(",")}
    except ValueError:
        raise ValueError(f"film_blocks must be 'all', 'none' or indices like '0,2', got {spec!r}") from None
    bad = sorted(i for i in chosen if not 0 <= i < num_blocks)
    if bad:
        raise ValueError(f"block indices {bad} are out of range 0..{num_blocks - 1} (num_blocks={num_blocks})")
    return [i in chosen for i in range(num_blocks)]


def parse_warmup(spec: str) -> tuple[int, float]:
    """'0' | '200' (steps) | '5%' (of the budget) -> (warmup_steps, warmup_fraction). ValueError otherwise."""
    text = spec.strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not (math.isfinite(fraction) and 0 <= fraction < 1):
                raise ValueError
            return 0, fraction
        steps = int(text)
        if steps < 0:
            raise ValueError
        return steps, 0.0
    except ValueError:
        raise ValueError("must be a number of steps (e.g. 200) or a share of the budget below 100% "
                         "(e.g. 5%)") from None
