"""The `ingestion` pipeline: validate, de-duplicate and split the image folder."""

from kedro.pipeline import Node, Pipeline

from .nodes import group_duplicates, scan_images, split_images, summarize_dataset


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `ingestion` pipeline."""
    return Pipeline(
        [
            Node(
                scan_images,
                inputs=["raw_images", "params:images", "params:ingestion"],
                outputs=["scanned_images", "scan_rejections"],
                name="scan_images",
            ),
            Node(
                group_duplicates,
                inputs=["scanned_images", "params:ingestion"],
                outputs=["grouped_images", "duplicate_groups"],
                name="group_duplicates",
            ),
            Node(
                split_images,
                inputs=[
                    "grouped_images",
                    "scan_rejections",
                    "duplicate_groups",
                    "label_exclusions",
                    "params:ingestion",
                ],
                outputs=["image_manifest", "rejected_images", "duplicate_report"],
                name="split_images",
            ),
            Node(
                summarize_dataset,
                inputs=[
                    "image_manifest",
                    "rejected_images",
                    "duplicate_report",
                    "params:ingestion",
                ],
                outputs=["dataset_summary", "class_distribution_plot"],
                name="summarize_dataset",
            ),
        ]
    )
