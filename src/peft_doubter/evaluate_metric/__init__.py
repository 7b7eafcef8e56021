"""The selective-prediction `evaluate` metric: ``evaluate.load(peft_doubter.evaluate_metric.METRIC_PATH)``."""

import os

METRIC_PATH = os.path.dirname(os.path.abspath(__file__))
