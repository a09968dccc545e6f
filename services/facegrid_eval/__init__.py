"""Evaluation tools: accuracy on labelled photos, DET curves, threshold calibration.

Installed with the ``eval`` extra (scikit-image, matplotlib); no service imports it.
"""
