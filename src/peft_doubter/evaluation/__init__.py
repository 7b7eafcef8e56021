"""Honest evaluation: selective-prediction metrics with confidence intervals, the baselines every Doubter result
stands beside, risk control (Learn-then-Test, conformal), the Doubter's confidence, the evaluation protocol and its
report. `metrics`, `risk_control` and `report` import no torch."""
