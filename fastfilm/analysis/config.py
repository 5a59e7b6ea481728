"""Config dataclasses of `fastfilm analyze` and `fastfilm plot` (same style as fastfilm/config.py,
where they move when the command modules settle; the CLI is derived from them one to one)."""
from __future__ import annotations

from dataclasses import dataclass

from fastfilm.config import _f


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
    reference: bool = _f(False, "run the plain reference model instead of the fast path (same weights)")
    amp: str = _f("bf16", "autocast dtype: bf16, fp16 or off (fp32); the model runs eagerly (hooks observe it)",
                  choices=("bf16", "fp16", "off"))


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
