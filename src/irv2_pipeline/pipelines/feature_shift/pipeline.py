"""The `feature_shift` pipeline: how far the images are from ImageNet, and the plan."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    measure_sources,
    measure_split_shift,
    plan_finetuning,
    profile_bn_shift,
    rank_sources,
    sample_images,
    score_transferability,
    select_source,
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
                measure_sources,
                inputs={
                    "feature_shift_sample": "feature_shift_sample",
                    "raw_images": "raw_images",
                    "model": "params:model",
                    "images": "params:images",
                    "feature_shift": "params:feature_shift",
                    "finetune": "params:finetune",
                },
                outputs="source_measurements",
                name="measure_sources",
            ),
            Node(
                rank_sources,
                inputs=[
                    "source_measurements",
                    "params:model",
                    "params:feature_shift",
                    "params:finetune",
                ],
                outputs=[
                    "source_ranking",
                    "source_transferability",
                    "chosen_source",
                    "source_ranking_plot",
                ],
                name="rank_sources",
            ),
            Node(
                select_source,
                inputs=["source_measurements", "chosen_source"],
                outputs="feature_shift_measurements",
                name="select_source",
            ),
            Node(
                profile_bn_shift,
                inputs="feature_shift_measurements",
                outputs="bn_shift_profile",
                name="profile_bn_shift",
            ),
            Node(
                summarize_bn_shift,
                inputs=[
                    "bn_shift_profile",
                    "chosen_source",
                    "params:model",
                    "params:feature_shift",
                ],
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
                inputs={
                    "bn_shift_profile": "bn_shift_profile",
                    "transferability": "transferability",
                    "image_manifest": "image_manifest",
                    "chosen_source": "chosen_source",
                    "model": "params:model",
                    "feature_shift": "params:feature_shift",
                },
                outputs="finetune_plan",
                name="plan_finetuning",
            ),
        ]
    )
