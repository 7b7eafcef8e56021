"""Selective-prediction metric for `evaluate`: ``evaluate.load("<path to this folder>")``.

``predictions`` are confidences in [0, 1] (higher = more likely correct), ``references`` the 0/1 correctness of
the answers they score. The result is :func:`peft_doubter.evaluation.metrics.summarize`.
"""

import datasets
import evaluate

from peft_doubter.evaluation.metrics import summarize


_DESCRIPTION = """
Honest selective-prediction evaluation of a confidence score against answer correctness: base accuracy, AUROC for
correctness (ties 1/2), AURC and E-AURC (AURC minus the oracle's), PRR on the risk-coverage curve, selective
accuracy at fixed coverages (the ceil(c*n) most confident answered), ECE (equal-width bins) and Brier score, each
with a percentile-bootstrap confidence interval over questions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): confidence that each answer is correct, in [0, 1].
    references (`list` of `int`): 1 if the answer is correct, else 0.
    coverages (`tuple` of `float`, default (0.2, 0.5, 0.8)): coverages for selective accuracy.
    n_resamples (`int`, default 1000): bootstrap resamples.
    seed (`int`, default 0): bootstrap seed.
    n_bins (`int`, default 15): ECE bins.
    alpha (`float`, default 0.05): 1 - confidence level of the intervals.
Returns:
    Flat dict: `n`, and for each of `accuracy`, `auroc`, `aurc`, `eaurc`, `prr`, `ece`, `brier`,
    `sel_acc@<percent>` the value plus `<name>_ci_low` and `<name>_ci_high`.
Examples:
    >>> metric = evaluate.load("src/peft_doubter/evaluation/evaluate_metric")
    >>> out = metric.compute(predictions=[0.9, 0.8, 0.7, 0.6, 0.5], references=[1, 0, 1, 1, 0], n_resamples=100)
    >>> round(out["auroc"], 4)
    0.6667
"""

_CITATION = """
@inproceedings{geifman2019biasreduced,
  title={Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers},
  author={Geifman, Yonatan and Uziel, Guy and El-Yaniv, Ran},
  booktitle={ICLR},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelectivePrediction(evaluate.Metric):
    """Risk-coverage, AUROC, calibration and bootstrap intervals for a confidence score."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, coverages=(0.2, 0.5, 0.8), n_resamples=1000, seed=0, n_bins=15,
                 alpha=0.05):
        return summarize(references, predictions, coverages=coverages, n_resamples=n_resamples, seed=seed,
                         n_bins=n_bins, alpha=alpha)
