"""Evaluation as a layer above a run: confidence intervals, calibration, operating points.

Every function takes predictions (labels, logits or probabilities, groups) as numpy arrays
and returns numbers or plots; none touches torch or a model, so `eval`, `cv`, the report and
research scripts use them as they are.
"""
