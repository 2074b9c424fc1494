"""The `export` pipeline: a SavedModel, a LiteRT file, labels.txt and a model card."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_saved_model, convert_to_litert, labels_text, model_card


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `export` pipeline."""
    return Pipeline(
        [
            Node(
                build_saved_model,
                inputs={
                    "finetuned_model": "finetuned_model",
                    "class_names": "class_names",
                    "model": "params:model",
                },
                outputs="export_saved_model",
                name="build_saved_model",
            ),
            Node(
                convert_to_litert,
                inputs={
                    "export_saved_model": "export_saved_model",
                    "export": "params:export",
                },
                outputs="export_litert",
                name="convert_to_litert",
            ),
            Node(
                labels_text,
                inputs="class_names",
                outputs="export_labels",
                name="write_labels",
            ),
            Node(
                model_card,
                inputs={
                    "finetuned_model": "finetuned_model",
                    "class_names": "class_names",
                    "evaluation_metrics": "evaluation_metrics",
                    "finetune_plan": "finetune_plan",
                    "model": "params:model",
                    "images": "params:images",
                    "finetune": "params:finetune",
                    "export": "params:export",
                },
                outputs="export_model_card",
                name="write_model_card",
            ),
        ]
    )
