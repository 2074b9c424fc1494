"""Tests of the pipelines, one folder per pipeline."""
