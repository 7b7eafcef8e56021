"""Confidence scores of the baselines every Doubter result is compared against.

All scores come from cached pass-1 features (:class:`PassOneFeatures`) and hidden states; nothing here calls a
model. Every score is a confidence in [0, 1] (higher = more likely correct). Scores that are not probabilities
(margin, entropy) are mapped into [0, 1] by a monotone transform, which leaves every ranking metric (AUROC, AURC,
selective accuracy) unchanged; their ECE and Brier describe that transform, not a calibrated probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass
class PassOneFeatures:
    """What pass 1 exposed about one question's answer (natural-log probabilities throughout).

    Open QA fills ``token_logprobs``; multiple choice fills ``option_logprobs``; both may fill the first-token
    fields (for multiple choice the first answer token is the option letter).
    """

    token_logprobs: list[float] = field(default_factory=list)  # log p of each generated answer token
    first_token_top2_logprobs: tuple[float, float] | None = None  # two largest log-probs at the first answer token
    first_token_entropy: float | None = None  # entropy (nats) of the first answer token's distribution
    option_logprobs: list[float] = field(default_factory=list)  # one score per option, any log scale


def _signals(features: Sequence[PassOneFeatures]) -> dict[str, np.ndarray]:
    """Raw (unbounded) answer-probability signals present for every question, higher = more confident."""
    out: dict[str, np.ndarray] = {}
    if all(f.token_logprobs for f in features):
        out["first_token_logprob"] = np.array([f.token_logprobs[0] for f in features], dtype=np.float64)
        out["min_token_logprob"] = np.array([min(f.token_logprobs) for f in features], dtype=np.float64)
        out["sequence_logprob"] = np.array([sum(f.token_logprobs) for f in features], dtype=np.float64)
        out["mean_token_logprob"] = np.array([np.mean(f.token_logprobs) for f in features], dtype=np.float64)
    if all(len(f.option_logprobs) >= 2 for f in features):
        scores = [np.asarray(f.option_logprobs, dtype=np.float64) for f in features]
        out["option_max_logprob"] = np.array([s.max() - np.logaddexp.reduce(s) for s in scores])  # log max softmax
    if all(f.first_token_top2_logprobs is not None for f in features):
        top2 = np.array([f.first_token_top2_logprobs for f in features], dtype=np.float64)
        out["logit_margin"] = top2[:, 0] - top2[:, 1]  # log-prob difference = logit difference
    if all(f.first_token_entropy is not None for f in features):
        out["neg_entropy"] = -np.array([f.first_token_entropy for f in features], dtype=np.float64)
    return out


_TO_UNIT = {  # monotone maps of each signal into [0, 1], keyed by baseline name
    "first_token_logprob": ("p_first_token", np.exp),  # probability of the first answer token
    "min_token_logprob": ("p_min_token", np.exp),  # smallest answer-token probability
    "sequence_logprob": ("p_sequence", np.exp),  # probability of the whole answer (MSP of the sequence)
    "mean_token_logprob": ("p_mean_token", np.exp),  # geometric mean of the token probabilities (length-normalised)
    "option_max_logprob": ("option_msp", np.exp),  # max softmax probability over the options
    "logit_margin": ("logit_margin", lambda m: 1.0 - np.exp(-m)),  # 1 - p2 / p1
    "neg_entropy": ("neg_entropy", np.exp),  # exp(-entropy)
}


def answer_probability_scores(features: Sequence[PassOneFeatures]) -> dict[str, np.ndarray]:
    """The answer-probability baselines available for these questions, each a confidence in [0, 1].

    ``p_first_token`` = p(first answer token); ``p_min_token`` = min over answer tokens of p(token);
    ``p_sequence`` = p(answer) = the product over its tokens; ``p_mean_token`` = their geometric mean;
    ``option_msp`` = max softmax over ``option_logprobs``; ``logit_margin`` = ``1 - exp(-(l1 - l2))`` = 1 - p2/p1
    at the first answer token; ``neg_entropy`` = ``exp(-H)`` of the first answer token's distribution.
    """
    return {_TO_UNIT[k][0]: np.clip(_TO_UNIT[k][1](v), 0.0, 1.0) for k, v in _signals(features).items()}


def answer_feature_matrix(features: Sequence[PassOneFeatures], names: Sequence[str] | None = None) -> np.ndarray:
    """Raw answer-probability signals as columns (log-probs, margin, negative entropy) for a probe.

    ``names`` fixes the columns (so train and test match); by default every signal present is used.
    """
    signals = _signals(features)
    names = sorted(signals) if names is None else list(names)
    missing = [n for n in names if n not in signals]
    if missing:
        raise ValueError(f"Answer-probability signals {missing} are missing for some questions.")
    return np.stack([signals[n] for n in names], axis=1) if names else np.empty((len(features), 0))


def random_confidence(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random confidences: the abstain-at-random baseline."""
    return np.random.default_rng(seed).random(n)


class LogisticProbe:
    """Logistic regression on standardized features predicting pass-1 correctness.

    The inverse regularization ``C`` is chosen from ``Cs`` by stratified k-fold cross-validation (log loss) on
    the training data given to :meth:`fit` only; the scaler is refit inside each fold. ``n_jobs`` fits the folds in
    that many processes (joblib's convention: -1 is every core).
    """

    def __init__(self, Cs: Sequence[float] = tuple(np.logspace(-4, 2, 7)), n_splits: int = 5, seed: int = 0,
                 max_iter: int = 2000, n_jobs: int | None = None) -> None:
        self.Cs = tuple(Cs)
        self.n_splits = n_splits
        self.seed = seed
        self.max_iter = max_iter
        self.n_jobs = n_jobs
        self._search: GridSearchCV | None = None

    def fit(self, X: ArrayLike, y: ArrayLike) -> LogisticProbe:
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(bool)
        minority = int(min(y.sum(), (~y).sum()))
        if minority < 2:
            raise ValueError("`LogisticProbe.fit` needs at least 2 right and 2 wrong training answers.")
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=self.max_iter))
        self._search = GridSearchCV(
            pipeline,
            {"logisticregression__C": list(self.Cs)},
            scoring="neg_log_loss",
            cv=StratifiedKFold(min(self.n_splits, minority), shuffle=True, random_state=self.seed),
            n_jobs=self.n_jobs,
        )
        self._search.fit(X, y)
        return self

    @property
    def C_(self) -> float:
        """The cross-validated inverse regularization strength."""
        if self._search is None:
            raise RuntimeError("Call `fit` first.")
        return float(self._search.best_params_["logisticregression__C"])

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """P(correct) for each row, shape ``(n,)``."""
        if self._search is None:
            raise RuntimeError("Call `fit` first.")
        return self._search.predict_proba(np.asarray(X, dtype=np.float64))[:, 1]


def answer_token_summary(states: Sequence[np.ndarray], signals: Sequence[np.ndarray]) -> np.ndarray:
    """Per question: the mean over the answer's tokens of their read-layer states (L, R, H) and the minimum, mean
    and maximum of each token signal (L, S), plus the answer length (zeros for an empty answer)."""
    rows = []
    for state, signal in zip(states, signals):
        state, signal = np.asarray(state, dtype=np.float64), np.asarray(signal, dtype=np.float64)
        if len(state):
            summary = [state.mean(0).ravel(), signal.min(0), signal.mean(0), signal.max(0), [len(state)]]
        else:
            summary = [np.zeros(int(np.prod(state.shape[1:]))), *(np.zeros(signal.shape[1]),) * 3, [0]]
        rows.append(np.concatenate(summary))
    return np.stack(rows)


class StackedGBM:
    """Gradient-boosted trees (scikit-learn's `HistGradientBoostingClassifier`, early-stopped on a held-out tenth of
    the training data) predicting pass-1 correctness. No class weights: the ranking it is judged on does not need
    them, and with sample weights scikit-learn bins each feature by weighted percentiles, which took over 15 minutes
    on the ~7,700 features of an answer-reading TriviaQA run (unweighted binning takes seconds)."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.model = HistGradientBoostingClassifier(learning_rate=0.05, max_iter=500, max_leaf_nodes=15,
                                                    l2_regularization=1.0, early_stopping=True,
                                                    validation_fraction=0.1, n_iter_no_change=30,
                                                    random_state=seed)

    def fit(self, X: ArrayLike, y: ArrayLike) -> StackedGBM:
        self.model.fit(np.asarray(X, dtype=np.float64), np.asarray(y).astype(bool))
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        return self.model.predict_proba(np.asarray(X, dtype=np.float64))[:, 1]


def baseline_confidences(
    train_features: Sequence[PassOneFeatures],
    train_correct: ArrayLike,
    test_features: Sequence[PassOneFeatures],
    hidden_train: ArrayLike,
    hidden_test: ArrayLike,
    seed: int = 0,
    extra_train: ArrayLike | None = None,
    extra_test: ArrayLike | None = None,
    n_jobs: int | None = None,
) -> dict[str, np.ndarray]:
    """Every baseline's confidence on the same test questions.

    Keys: ``random``; the answer-probability scores available (see :func:`answer_probability_scores`);
    ``probe`` (:class:`LogisticProbe` on the hidden states); ``probe+answer_prob`` (the probe on the hidden states
    concatenated with :func:`answer_feature_matrix`); with ``extra_*`` features (e.g. :func:`answer_token_summary`,
    what an answer-reading Doubter sees beyond the read position), the stacked baselines ``stacked_lr`` and
    ``stacked_gbm`` on the union of all of them. Everything is fit on the train split only; the probes'
    cross-validation runs in ``n_jobs`` processes.
    """
    hidden_train = np.asarray(hidden_train, dtype=np.float64)
    hidden_test = np.asarray(hidden_test, dtype=np.float64)
    train_correct = np.asarray(train_correct).astype(bool)
    if not len(train_features) == len(train_correct) == hidden_train.shape[0]:
        raise ValueError("`train_features`, `train_correct` and `hidden_train` must have the same length.")
    if len(test_features) != hidden_test.shape[0]:
        raise ValueError("`test_features` and `hidden_test` must have the same length.")

    out = {"random": random_confidence(len(test_features), seed)}
    out.update(answer_probability_scores(test_features))

    def probe(x_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
        return LogisticProbe(seed=seed, n_jobs=n_jobs).fit(x_train, train_correct).predict_proba(x_test)

    out["probe"] = probe(hidden_train, hidden_test)
    names = sorted(_signals(test_features))
    if names:
        x_train = np.hstack([hidden_train, answer_feature_matrix(train_features, names)])
        x_test = np.hstack([hidden_test, answer_feature_matrix(test_features, names)])
        out["probe+answer_prob"] = probe(x_train, x_test)
        if extra_train is not None and extra_test is not None:
            x_train = np.hstack([x_train, np.asarray(extra_train, dtype=np.float64)])
            x_test = np.hstack([x_test, np.asarray(extra_test, dtype=np.float64)])
            out["stacked_lr"] = probe(x_train, x_test)
            out["stacked_gbm"] = StackedGBM(seed=seed).fit(x_train, train_correct).predict_proba(x_test)
    return out
