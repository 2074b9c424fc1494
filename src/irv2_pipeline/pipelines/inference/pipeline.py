"""The `inference` pipeline: predictions, OOD flags and a shift test for new images."""

from kedro.pipeline import Node, Pipeline

from irv2_pipeline.reference_features import reference_node

from .nodes import (
    fit_ood_detector,
    inference_report,
    predict_new_images,
    prediction_table,
    reference_sample,
    scan_new_images,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `inference` pipeline."""
    model_inputs = {
        "finetuned_model": "finetuned_model",
        "class_names": "class_names",
        "model": "params:model",
        "images": "params:images",
        "inference": "params:inference",
    }
    return Pipeline(
        [
            Node(
                scan_new_images,
                inputs={
                    "new_images": "new_images",
                    "images": "params:images",
                    "inference": "params:inference",
                },
                outputs=["new_image_list", "inference_rejected"],
                name="scan_new_images",
            ),
            # evaluation's node: after `kedro run` it finds its stored features
            # current and embeds nothing.
            reference_node(),
            Node(
                reference_sample,
                inputs={
                    "reference_features": "reference_features",
                    "model": "params:model",
                    "inference": "params:inference",
                },
                outputs="inference_reference_features",
                name="sample_reference_features",
            ),
            Node(
                fit_ood_detector,
                inputs={
                    "reference_features": "inference_reference_features",
                    "inference": "params:inference",
                },
                outputs="ood_detector",
                name="fit_ood_detector",
            ),
            Node(
                predict_new_images,
                inputs={
                    **model_inputs,
                    "new_image_list": "new_image_list",
                    "new_images": "new_images",
                },
                outputs="new_image_outputs",
                name="predict_new_images",
            ),
            Node(
                prediction_table,
                inputs={
                    "new_image_list": "new_image_list",
                    "model_outputs": "new_image_outputs",
                    "ood_detector": "ood_detector",
                    "class_names": "class_names",
                    "inference": "params:inference",
                },
                outputs="predictions",
                name="tabulate_predictions",
            ),
            Node(
                inference_report,
                inputs={
                    "predictions": "predictions",
                    "inference_rejected": "inference_rejected",
                    "ood_detector": "ood_detector",
                    "reference_features": "inference_reference_features",
                    "model_outputs": "new_image_outputs",
                    "model": "params:model",
                    "inference": "params:inference",
                },
                outputs="inference_report",
                name="write_inference_report",
            ),
        ]
    )
