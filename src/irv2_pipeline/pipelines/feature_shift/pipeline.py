"""The `feature_shift` pipeline: how far the images are from ImageNet, and the plan."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    measure_backbone,
    measure_split_shift,
    plan_finetuning,
    profile_bn_shift,
    sample_images,
    score_transferability,
    summarize_bn_shift,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `feature_shift` pipeline."""
    return Pipeline(
        [
            Node(
                sample_images,
                inputs=["image_manifest", "params:model", "params:feature_shift"],
                outputs="feature_shift_sample",
                name="sample_feature_shift_images",
            ),
            Node(
                measure_backbone,
                inputs={
                    "feature_shift_sample": "feature_shift_sample",
                    "raw_images": "raw_images",
                    "model": "params:model",
                    "images": "params:images",
                    "feature_shift": "params:feature_shift",
                    "finetune": "params:finetune",
                },
                outputs="feature_shift_measurements",
                name="measure_backbone",
            ),
            Node(
                profile_bn_shift,
                inputs="feature_shift_measurements",
                outputs="bn_shift_profile",
                name="profile_bn_shift",
            ),
            Node(
                summarize_bn_shift,
                inputs=["bn_shift_profile", "params:model", "params:feature_shift"],
                outputs=["feature_shift_summary", "bn_shift_plot"],
                name="summarize_bn_shift",
            ),
            Node(
                measure_split_shift,
                inputs=[
                    "feature_shift_measurements",
                    "params:model",
                    "params:feature_shift",
                ],
                outputs="split_shift",
                name="measure_split_shift",
            ),
            Node(
                score_transferability,
                inputs=[
                    "feature_shift_measurements",
                    "params:model",
                    "params:feature_shift",
                ],
                outputs="transferability",
                name="score_transferability",
            ),
            Node(
                plan_finetuning,
                inputs=[
                    "bn_shift_profile",
                    "transferability",
                    "image_manifest",
                    "params:model",
                    "params:feature_shift",
                ],
                outputs="finetune_plan",
                name="plan_finetuning",
            ),
        ]
    )
