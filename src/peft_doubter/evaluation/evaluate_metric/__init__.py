"""The selective-prediction `evaluate` metric: ``evaluate.load(peft_doubter.evaluation.evaluate_metric.METRIC_PATH)``."""

import os


METRIC_PATH = os.path.dirname(os.path.abspath(__file__))
