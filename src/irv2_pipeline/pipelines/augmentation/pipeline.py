"""The `augmentation` pipeline: the images training reads, on disk.

Augmented copies of the training images, and every accepted image at the model's size.
"""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    plan_augmentation,
    preview_augmentation,
    write_augmented_images,
    write_resized_images,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `augmentation` pipeline."""
    return Pipeline(
        [
            Node(
                plan_augmentation,
                inputs=["image_manifest", "params:model", "params:augmentation"],
                outputs="augmentation_plan",
                name="plan_augmentation",
            ),
            Node(
                write_augmented_images,
                inputs=[
                    "augmentation_plan",
                    "raw_images",
                    "params:images",
                    "params:model",
                    "params:augmentation",
                ],
                # The images first: Kedro saves a node's outputs in this order
                # (unless --async), so the manifest is written after its files.
                outputs=["augmented_images", "augmented_manifest"],
                name="write_augmented_images",
            ),
            Node(
                write_resized_images,
                inputs=[
                    "image_manifest",
                    "raw_images",
                    "params:images",
                    "params:model",
                    "params:augmentation",
                ],
                outputs=["resized_images", "resized_manifest"],
                name="write_resized_images",
            ),
            Node(
                preview_augmentation,
                inputs=[
                    "augmented_manifest",
                    "augmented_images",
                    "raw_images",
                    "params:images",
                    "params:augmentation",
                ],
                outputs="augmentation_preview",
                name="preview_augmentation",
            ),
        ]
    )
