"""irv2_pipeline: fine-tune InceptionResNetV2 on your own image folders."""

__version__ = "0.1.0"
