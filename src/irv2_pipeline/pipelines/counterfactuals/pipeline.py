"""The `counterfactuals` pipeline: one namespace per variant, then their comparison.

Each namespace (``ours``, ``all_frozen``, ...) holds a copy of ``finetune``'s
training node and ``evaluation``'s test-prediction node, fed by ``configure_variant``;
catalog factories (``"{variant}.finetuned_model"``, ...) give every variant its own
files. Kedro-Viz draws each namespace as a group that folds.
"""

import warnings
from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from irv2_pipeline.pipelines.evaluation.nodes import predict_test_split
from irv2_pipeline.pipelines.finetune.nodes import train_classifier

from .nodes import (
    PREDICTIONS_SUFFIX,
    STAGES_SUFFIX,
    configure_variant_named,
    plot_counterfactuals,
    summarise_counterfactuals,
    write_counterfactual_report,
)

# Datasets every variant shares: our inputs, read, never written.
SHARED_INPUTS = {
    "image_manifest",
    "augmented_manifest",
    "finetune_plan",
    "raw_images",
    "resized_manifest",
    "resized_images",
    "augmented_images",
}
SHARED_PARAMETERS = {
    "params:finetune",
    "params:model",
    "params:images",
    "params:evaluation",
    "params:feature_shift.plan_rules",
}


def variant_pipeline(name: str) -> Pipeline:
    """The nodes of one variant, in namespace ``name``."""
    template = Pipeline(
        [
            Node(
                configure_variant_named(name),
                inputs={
                    "variant": "params:variant",
                    "finetune": "params:finetune",
                    "finetune_plan": "finetune_plan",
                    "augmented_manifest": "augmented_manifest",
                    "plan_rules": "params:feature_shift.plan_rules",
                },
                outputs=[
                    "variant_finetune",
                    "variant_plan",
                    "variant_augmented_manifest",
                    "variant_plan_rules",
                ],
                name="configure_variant",
            ),
            Node(
                train_classifier,
                inputs={
                    "image_manifest": "image_manifest",
                    "augmented_manifest": "variant_augmented_manifest",
                    "finetune_plan": "variant_plan",
                    "resized_manifest": "resized_manifest",
                    "resized_images": "resized_images",
                    "augmented_images": "augmented_images",
                    "model": "params:model",
                    "images": "params:images",
                    "finetune": "variant_finetune",
                    "plan_rules": "variant_plan_rules",
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
                predict_test_split,
                inputs={
                    "finetuned_model": "finetuned_model",
                    "class_names": "class_names",
                    "image_manifest": "image_manifest",
                    "raw_images": "raw_images",
                    "model": "params:model",
                    "images": "params:images",
                    "evaluation": "params:evaluation",
                },
                outputs="test_predictions",
                name="predict_test_split",
            ),
        ]
    )
    return Pipeline(
        template,
        namespace=name,
        inputs=SHARED_INPUTS,
        parameters={
            "params:variant": f"params:counterfactuals.variants.{name}",
            **{parameter: parameter for parameter in SHARED_PARAMETERS},
        },
    )


def create_pipeline(variants: Sequence[str] = (), **kwargs) -> Pipeline:
    """Creates the `counterfactuals` pipeline.

    Args:
        variants: The variants it holds, the reference first
            (``variants.selected_variants`` of the ``counterfactuals`` parameters).
    """
    outputs = {
        f"{name}{suffix}": f"{name}{suffix}"
        for name in variants
        for suffix in (PREDICTIONS_SUFFIX, STAGES_SUFFIX)
    }
    with warnings.catch_warnings():
        # Kedro warns of dotted names outside their namespace; reading every
        # variant's outputs is what this node is for.
        warnings.filterwarnings("ignore", "One or more dataset names contain")
        summary = Node(
            summarise_counterfactuals,
            inputs={
                "counterfactuals": "params:counterfactuals",
                "evaluation": "params:evaluation",
                **outputs,
            },
            outputs="counterfactual_summary",
            name="summarise_counterfactuals",
        )
    return Pipeline(
        [
            *(variant_pipeline(name) for name in variants),
            summary,
            Node(
                plot_counterfactuals,
                inputs="counterfactual_summary",
                outputs="counterfactual_chart",
                name="plot_counterfactuals",
            ),
            Node(
                write_counterfactual_report,
                inputs=[
                    "counterfactual_summary",
                    "params:counterfactuals",
                    "finetune_plan",
                ],
                outputs="counterfactual_report",
                name="write_counterfactual_report",
            ),
        ]
    )
