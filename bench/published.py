"""Published numbers that are comparable to the binary and the categorical VAE benchmarks, with
where each was read and how its settings differ from ours.

``bench/report.py`` puts :func:`published_markdown` after the measured tables of the
``estimators`` (binary VAE) and ``categorical_vae`` sections, and writes it to
``bench/results/<section>/published.md`` for the documentation pages.

Rule for this file: every number in it is quoted from a text that was retrieved and read (the
paper, a copy of it, a README or a results file), and says where; nothing is written from
memory. A paper whose table could not be retrieved is listed in :data:`NOT_RETRIEVED` with the
settings that could be read from its code, and no numbers.

Published values are negative ELBOs or negative multi-sample bounds in nats (lower is
better). Ours are shown with the same sign (``-ELBO``), so the two columns read the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Row:
    """One published value and the estimator of ours nearest to it (``None``: no counterpart)."""

    theirs: str  #: the estimator as the paper names it
    value: float  #: the published number, as printed
    ours: str | None = None  #: key of our estimator in the benchmark's JSON
    match: str = ""  #: how close our estimator is to theirs


@dataclasses.dataclass(frozen=True)
class Table:
    """A published table row set, comparable to one configuration of our benchmark."""

    paper: str
    table: str  #: which table / row of the paper
    read_from: str  #: where the text was retrieved and read
    metric: str  #: what the number is, in the paper's words where possible
    rows: tuple[Row, ...]
    ours_result: str  #: our JSON (relative to the results folder) to put beside it
    ours_label: str
    settings: tuple[tuple[str, str, str], ...]  #: (aspect, theirs, ours)


@dataclasses.dataclass(frozen=True)
class NotRetrieved:
    """A paper whose table could not be retrieved: what was tried, and its settings as read
    from its code (no numbers)."""

    paper: str
    wanted: str
    tried: str
    settings: tuple[tuple[str, str], ...]  #: (aspect, theirs, with the file it was read from)


_JANG = ("Jang, Gu & Poole, *Categorical Reparameterization with Gumbel-Softmax*, ICLR 2017 "
         "(arXiv:1611.01144)")
_JANG_READ = (
    "Table 1 of the latest arXiv version as rendered by ar5iv "
    "(<https://ar5iv.labs.arxiv.org/html/1611.01144>), read from a clipping of that page kept in "
    "a public GitHub repository (the clipping's front matter names the source URL), and checked "
    "against a second, independent markdown conversion of a PDF of the paper in another public "
    "repository (same numbers and caption; that copy calls the VAE's prior *uniform* where the "
    "ar5iv one says *learned*). The paper's text gives no number of training steps or epochs "
    "and no training-set size.")
_PLAIN_ST = ("plain straight-through (Bengio et al. 2013): not among the benchmark's "
             "estimators")
_JANG_METRIC = ("negative variational lower bound on the *test* set, a multi-sample bound with "
                "m = 1000 (an importance-weighted bound: tighter than the ELBO of the same model)")
_JANG_COMMON = (
    ("data", "\"the MNIST dataset with fixed binarization for training and evaluation\" "
     "(citing Salakhutdinov & Murray 2008, Larochelle & Murray 2011); learning rate picked on "
     "the MNIST validation set, performance reported on the test set; size not stated",
     "train: {train}; held-out: {held_out}"),
    ("binarisation", "fixed (one binarisation for all of training and evaluation)",
     "dynamic (a fresh Bernoulli draw of every pixel per batch)"),
    ("estimators", "single-sample (\"we are comparing estimators for single-sample "
     "objectives\"); SF, DARN and MuProp with variance normalisation",
     "K = {num_particles} particles for every estimator; `score` has a moving-average "
     "baseline"),
    ("optimiser", "SGD with momentum 0.9, learning rate chosen per estimator from "
     "{3e-5, 1e-5, 3e-4, 1e-4, 3e-3, 1e-3} on the validation set",
     "Adam, learning rate {lr} for every estimator, no tuning"),
    ("relaxation temperature", "annealed, tau = max(0.5, exp(-r t)) updated every N steps, "
     "N in {500, 1000}, r in {1e-5, 1e-4} picked on the validation set",
     "fixed at 0.5"),
    ("training length", "not stated in the paper's text",
     "{steps} steps of batch {batch_size} (seeds {seeds})"),
)

#: the published tables we could retrieve, by section of the report
PUBLISHED: dict[str, tuple[Table, ...]] = {
    "binary": (
        Table(
            paper=_JANG, table="Table 1, row \"VAE (Bern.)\"", read_from=_JANG_READ,
            metric="negative variational lower bound (nats) on the MNIST test set, lower is "
                   "better",
            rows=(
                Row("SF", 112.2, "score", "score function; ours with a moving-average baseline, "
                    "K = 2; theirs single-sample with variance normalisation"),
                Row("DARN", 110.9),
                Row("MuProp", 109.7),
                Row("ST", 116.0, None, _PLAIN_ST),
                Row("Annealed ST", 111.5),
                Row("Gumbel-S.", 105.0, "gumbel", "Concrete relaxation; ours at fixed "
                    "temperature 0.5"),
                Row("ST Gumbel-S.", 111.5, "st", "straight-through Gumbel-softmax; ours at "
                    "fixed temperature 0.5"),
            ),
            ours_result="estimators/estimators.json",
            ours_label="linear binary VAE",
            settings=(
                ("model", "784-200-784, 200 Bernoulli latents (Figure 4 caption)",
                 "linear 784-200-784, 200 Bernoulli latents, learned prior logits"),
                ("metric", _JANG_METRIC, "held-out ELBO with K = {num_particles} particles, "
                 "on held-out images (a looser bound than theirs for the same model)"),
            ) + _JANG_COMMON,
        ),
    ),
    "categorical": (
        Table(
            paper=_JANG, table="Table 1, row \"VAE (Cat.)\"", read_from=_JANG_READ,
            metric="negative variational lower bound (nats) on the MNIST test set, lower is "
                   "better",
            rows=(
                Row("SF", 110.6, "score", "score function; ours with a moving-average baseline, "
                    "K = 4; theirs single-sample with variance normalisation"),
                Row("DARN", 128.8),
                Row("MuProp", 107.0),
                Row("ST", 110.9, None, _PLAIN_ST),
                Row("Annealed ST", 107.8),
                Row("Gumbel-S.", 101.5, "gumbel", "Gumbel-softmax; ours at fixed temperature "
                    "0.5 with Maddison et al.'s relaxed objective"),
                Row("ST Gumbel-S.", 107.8, "st", "straight-through Gumbel-softmax; ours at "
                    "fixed temperature 0.5"),
            ),
            ours_result="categorical_vae/categorical_vae.json",
            ours_label="linear categorical VAE",
            settings=(
                ("model", "20 categorical latents of 10 classes; the Figure 4 caption writes "
                 "the network as 784-(20x10)-200",
                 "linear 784-200-784, 20 x Categorical(10), uniform prior"),
                ("prior", "\"a learned categorical prior\" (the ar5iv copy; the other copy says "
                 "\"a uniform categorical prior\")", "uniform"),
                ("metric", _JANG_METRIC, "held-out ELBO with K = {num_particles} particles (a "
                 "looser bound than theirs for the same model); the -L_S column, "
                 "sg.log_marginal_likelihood with S = {is_particles} on the first {is_images} "
                 "held-out images, is the closer measure"),
            ) + _JANG_COMMON,
        ),
    ),
}

_DISARM_CODE = ("google-research/google-research `disarm/binary/experiment_launcher_singlelayer.py`"
                " (commit 30adf0ec) and `disarm/binary/dataset.py` (commit 35a5be24)")
_RODEO_CODE = ("thjashin/rodeo `README.md` (commit 82d768a7) and "
               "`experiment_launcher_singlelayer.py` (commit 4efafe54)")
_KOOL_CODE = ("wouterkool/estimating-gradients-without-replacement `vae/vae.py` and "
              "`vae/all_experiments.sh` (commit 20494fe)")
_TRIED = ("the paper's text: the stored copies of the paper's web pages (arXiv / ar5iv / "
          "OpenReview / review sites) hold only its opening (abstract and introduction), and no "
          "full-text copy was found in the public GitHub index; the authors' repository has "
          "code only, no results file")

#: papers whose tables could not be retrieved, by section of the report
NOT_RETRIEVED: dict[str, tuple[NotRetrieved, ...]] = {
    "binary": (
        NotRetrieved(
            paper="Dong, Mnih & Tucker, *DisARM: An Antithetic Gradient Estimator for Binary "
                  "Latent Variables*, NeurIPS 2020 (arXiv:2006.10680)",
            wanted="the single-stochastic-layer binary VAE results (ELBO of DisARM, ARM, "
                   "REINFORCE LOO, RELAX; linear and nonlinear; dynamic MNIST, Fashion-MNIST, "
                   "Omniglot)",
            tried=_TRIED + " (`disarm/README.md`: commands only)",
            settings=(
                ("data", "dynamic MNIST: a fresh Bernoulli draw per image per batch from the "
                 "first 50,000 images of the MNIST training split (`train[:50000]`; validation "
                 "`train[50000:]`, test = the test split) (" + _DISARM_CODE + ")"),
                ("model", "200 Bernoulli latents; linear 784-200-784 or nonlinear "
                 "200-200-200 / 200-200-784 with LeakyReLU(0.3); prior logits learned with SGD "
                 "at 1e-2; `--demean_input --initialize_with_bias` in the README's command"),
                ("training", "Adam, default learning rate 1e-4 (encoder and decoder), batch 50, "
                 "`--num_steps=1000000` (the README's command; also the default)"),
                ("estimators", "one antithetic pair (2 evaluations) by default (`num_pairs` "
                 "= 1); RELAX single-sample"),
                ("metric", "evaluation with `num_eval_samples` = 100 (a 100-sample bound); the "
                 "paper's Figure 5 caption, as quoted on a review page (<https://liner.com/"
                 "review/disarm-an-antithetic-gradient-estimator-for-binary-latent-variables>), "
                 "reports the ELBO on the *training* set, the 100-sample bound on the test set "
                 "and the gradient variance, mean and standard error over 5 runs"),
            ),
        ),
        NotRetrieved(
            paper="Shi, Zhou, Hwang, Titsias & Mackey, *Gradient Estimation with Discrete Stein "
                  "Operators* (RODEO), NeurIPS 2022 (arXiv:2202.09497)",
            wanted="the binary VAE table (RODEO against RLOO, DisARM, Double CV, RELAX, ARMS; "
                   "dynamically binarised MNIST, Fashion-MNIST, Omniglot)",
            tried=_TRIED + " (its README shows only variance plots, `results/var_dyn.png`)",
            settings=(
                ("data", "dynamically binarised MNIST, first 50,000 training images "
                 "(`train_size = 50000`) (" + _RODEO_CODE + ")"),
                ("model", "D = 200 Bernoulli latents, `--encoder_type=nonlinear` in the "
                 "README's command (linear also supported); prior learning rate 0 by default"),
                ("training", "Adam, learning rate 1e-3 for MNIST (README), batch 100, "
                 "1,000,000 steps (default `num_steps`), seeds 1-5"),
                ("estimators", "K evaluations of f per estimator (RELAX always 3); RODEO is "
                 "`discrete_stein_avg` at K = 2, `discrete_stein_output_avg` at K > 2"),
                ("metric", "evaluation with `num_eval_samples` = 100 (a 100-sample bound)"),
            ),
        ),
    ),
    "categorical": (
        NotRetrieved(
            paper="Kool, van Hoof & Welling, *Estimating Gradients for Discrete Random Variables "
                  "by Sampling without Replacement* (the unordered set estimator), ICLR 2020 "
                  "(arXiv:2002.06043)",
            wanted="the categorical VAE results (-ELBO of the unordered set estimator, "
                   "REINFORCE without replacement, sum-and-sample, REINFORCE with a sample "
                   "baseline, ARSM, RELAX, ST Gumbel-softmax; the 10^20 and 10^2 domains)",
            tried=_TRIED + " (`vae/plot_vae_results.ipynb` plots curves from pickled runs "
                  "that are not in the repository; its saved outputs are figures only); "
                  "whether the paper prints a table was therefore not checked",
            settings=(
                ("data", "TensorFlow's MNIST training split thresholded at 0.5 "
                 "(`x0 > .5`, static), or Larochelle's fixed binarisation with `--larochelle` "
                 "(" + _KOOL_CODE + ")"),
                ("model", "`--num_dimensions 20` (large domain, 10^20) or 2 (small, 10^2) "
                 "categorical latents of `num_categories` = 10; encoder 784-512-256 and decoder "
                 "256-512-784 with LeakyReLU(0.1) (adapted from ARSM)"),
                ("training", "batch 200, 1,000 epochs; learning rate 1e-3 (1e-4 for "
                 "`stgs` and `relax`, 3e-4 for `arsm`) in `all_experiments.sh`; analytic KL "
                 "with its direct gradient (`--add_direct_gradient`)"),
                ("estimators", "`--n_samples` 4 or 8 for the multi-sample estimators "
                 "(rf_unord, rfwr, sasbl), 1 for reinforce_bl, stgs, relax, arsm"),
            ),
        ),
    ),
}


def _ours(results: Path, table: Table) -> tuple[dict, dict[str, dict[str, float]]]:
    """Our run's settings, and our held-out -ELBO (and -L_S where measured) per estimator: mean
    and std over seeds. Empty when the results file is missing."""
    path = results / table.ours_result
    if not path.exists():
        return {}, {}
    data = json.loads(path.read_text())
    stats: dict[str, dict[str, float]] = {}
    for name, entry in data.get("estimators", {}).items():
        seeds = list(entry.get("seeds", {}).values())
        for key, label in (("test_elbo", "elbo"), ("test_bound", "bound")):
            values = [-s[key] for s in seeds if isinstance(s.get(key), (int, float))]
            if values:
                stats.setdefault(name, {})[label] = statistics.fmean(values)
                stats[name][label + "_std"] = (statistics.stdev(values) if len(values) > 1
                                               else 0.0)
    return data.get("settings", {}), stats


def _pm(stats: dict[str, float], label: str) -> str:
    if label not in stats:
        return "—"
    return f"{stats[label]:.2f} ± {stats[label + '_std']:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _one(results: Path, table: Table) -> str:
    settings, ours = _ours(results, table)
    has_bound = any("bound" in v for v in ours.values())
    header = ["estimator (paper)", "published -ELBO (nats)", f"ours ({table.ours_label})",
              "our held-out -ELBO"] + (["our held-out -L_S"] if has_bound else []) + ["match"]
    rows = []
    for row in table.rows:
        stats = ours.get(row.ours, {}) if row.ours else {}
        cells = [row.theirs, f"{row.value:.1f}", f"`{row.ours}`" if row.ours else "—",
                 _pm(stats, "elbo")] + ([_pm(stats, "bound")] if has_bound else [])
        cells.append(row.match or "no counterpart among the benchmark's estimators")
        rows.append(cells)
    ours_line = (f"(our results file `bench/results/{table.ours_result}` is missing: run the "
                 "section)" if not settings else
                 f"Ours: the {table.ours_label} of the table above ({settings.get('model', '?')}), "
                 f"mean ± std over seeds {settings.get('seeds', '?')}, the sign flipped to read "
                 "like the paper's (lower is better).")
    fields = collections.defaultdict(lambda: "?", settings)
    diff = _table(["setting", "paper", "ours"],
                  [[aspect, theirs, ours_text.format_map(fields)]
                   for aspect, theirs, ours_text in table.settings])
    return "\n\n".join([
        f"**{table.paper}**, {table.table}: {table.metric}.",
        f"Source: {table.read_from}",
        _table(header, rows),
        ours_line,
        "Where the settings differ (every row below is a reason the two columns are not "
        "directly comparable; several of them, the tighter bound and the tuned learning rates "
        "above all, make the published numbers lower than ours):",
        diff,
    ])


def _missing(entry: NotRetrieved) -> str:
    lines = [f"- **{entry.paper}**: {entry.wanted}. *Not retrieved*: {entry.tried}. "
             "No number of theirs is quoted here. Their settings, as read from their code:"]
    lines += [f"    - {aspect}: {text}" for aspect, text in entry.settings]
    return "\n".join(lines)


def published_markdown(kind: str, results: Path, heading: bool = True) -> str:
    """The "published numbers beside ours" part of the ``binary`` or ``categorical`` section,
    with our numbers read from the saved results under ``results`` (``heading``: start with
    its own ``###`` heading)."""
    parts = ["### Published numbers beside ours", ""] if heading else []
    parts += ["Generated from `bench/published.py`: every published number is quoted from a "
             "retrieved text, named below, never from memory; a paper whose table could not be "
             "retrieved is listed with its settings and no numbers."]
    for table in PUBLISHED.get(kind, ()):
        parts += ["", _one(results, table)]
    missing = NOT_RETRIEVED.get(kind, ())
    if missing:
        parts += ["", "Papers whose tables could not be retrieved here:", ""]
        parts += [_missing(entry) for entry in missing]
    return "\n".join(parts) + "\n"
