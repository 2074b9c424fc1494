"""Tests of the `evaluation` pipeline."""
