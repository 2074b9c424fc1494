"""The `finetune` pipeline: staged fine-tuning of InceptionResNetV2, and its curves."""

from kedro.pipeline import Node, Pipeline

from .nodes import plot_lr_finder, plot_training_curves, train_classifier


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `finetune` pipeline."""
    return Pipeline(
        [
            Node(
                train_classifier,
                inputs={
                    "image_manifest": "image_manifest",
                    "augmented_manifest": "augmented_manifest",
                    "finetune_plan": "finetune_plan",
                    "resized_manifest": "resized_manifest",
                    "resized_images": "resized_images",
                    "augmented_images": "augmented_images",
                    "model": "params:model",
                    "images": "params:images",
                    "finetune": "params:finetune",
                    "plan_rules": "params:feature_shift.plan_rules",
                },
                outputs=[
                    "finetuned_model",
                    "training_history",
                    "finetune_stages",
                    "class_names",
                    "lr_finder_curves",
                ],
                name="train_classifier",
            ),
            Node(
                plot_lr_finder,
                inputs="lr_finder_curves",
                outputs="lr_finder_plot",
                name="plot_lr_finder",
            ),
            Node(
                plot_training_curves,
                inputs="training_history",
                outputs="training_curves_plot",
                name="plot_training_curves",
            ),
        ]
    )
