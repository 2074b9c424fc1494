"""Tests of the `feature_shift` pipeline."""
