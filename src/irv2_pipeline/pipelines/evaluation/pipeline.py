"""The `evaluation` pipeline: test metrics, plots, a diagnosis and one report."""

from kedro.pipeline import Node, Pipeline

from irv2_pipeline.reference_features import reference_node

from .nodes import (
    diagnose_run,
    enforce_fail_on,
    find_label_issues,
    occlude_test_split,
    plot_confidently_wrong,
    plot_confusion_matrix,
    plot_grad_cam,
    plot_label_issues,
    plot_reliability,
    plot_validation_curves,
    predict_test_split,
    score_predictions,
    training_features,
    write_diagnosis_junit,
    write_html_report,
    write_report,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `evaluation` pipeline."""
    return Pipeline(
        [
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
            Node(
                score_predictions,
                inputs=["test_predictions", "params:evaluation"],
                outputs=["evaluation_metrics", "classification_report"],
                name="score_predictions",
            ),
            Node(
                plot_confusion_matrix,
                inputs="test_predictions",
                outputs="confusion_matrix_plot",
                name="plot_confusion_matrix",
            ),
            Node(
                plot_reliability,
                inputs=["test_predictions", "params:evaluation"],
                outputs="reliability_diagram_plot",
                name="plot_reliability",
            ),
            Node(
                plot_confidently_wrong,
                inputs=[
                    "test_predictions",
                    "raw_images",
                    "params:images",
                    "params:evaluation",
                ],
                outputs="confidently_wrong_plot",
                name="plot_confidently_wrong",
            ),
            Node(
                occlude_test_split,
                inputs={
                    "finetuned_model": "finetuned_model",
                    "test_predictions": "test_predictions",
                    "raw_images": "raw_images",
                    "model": "params:model",
                    "images": "params:images",
                    "evaluation": "params:evaluation",
                },
                outputs="occlusion_flips",
                name="occlude_test_split",
            ),
            Node(
                plot_grad_cam,
                inputs={
                    "finetuned_model": "finetuned_model",
                    "test_predictions": "test_predictions",
                    "raw_images": "raw_images",
                    "model": "params:model",
                    "images": "params:images",
                    "evaluation": "params:evaluation",
                },
                outputs="grad_cam_plot",
                name="plot_grad_cam",
            ),
            # Every training original and validation image through the model, kept
            # with its key for `inference` (reference_features.py).
            reference_node(),
            Node(
                training_features,
                inputs=["reference_features", "class_names"],
                outputs="training_features",
                name="select_training_features",
            ),
            Node(
                find_label_issues,
                inputs=["training_features", "class_names", "params:evaluation"],
                outputs=["label_issues", "label_noise_estimate"],
                name="find_label_issues",
            ),
            Node(
                plot_label_issues,
                inputs=[
                    "label_issues",
                    "raw_images",
                    "params:images",
                    "params:evaluation",
                ],
                outputs="label_issues_plot",
                name="plot_label_issues",
            ),
            Node(
                plot_validation_curves,
                inputs="training_history",
                outputs="validation_curves_plot",
                name="plot_validation_curves",
            ),
            Node(
                diagnose_run,
                inputs={
                    "evaluation_metrics": "evaluation_metrics",
                    "classification_report": "classification_report",
                    "test_predictions": "test_predictions",
                    "training_history": "training_history",
                    "bn_shift_profile": "bn_shift_profile",
                    "split_shift": "split_shift",
                    "finetune_stages": "finetune_stages",
                    "finetune_plan": "finetune_plan",
                    "image_manifest": "image_manifest",
                    "duplicate_report": "duplicate_report",
                    "dataset_summary": "dataset_summary",
                    "occlusion_flips": "occlusion_flips",
                    "label_noise_estimate": "label_noise_estimate",
                    "plan_rules": "params:feature_shift.plan_rules",
                    "evaluation": "params:evaluation",
                },
                outputs=["diagnosis", "diagnosis_not_judged"],
                name="diagnose_run",
            ),
            Node(
                write_report,
                inputs={
                    "evaluation_metrics": "evaluation_metrics",
                    "classification_report": "classification_report",
                    "diagnosis_findings": "diagnosis",
                    "diagnosis_not_judged": "diagnosis_not_judged",
                    "training_history": "training_history",
                    "bn_shift_profile": "bn_shift_profile",
                    "split_shift": "split_shift",
                    "transferability": "transferability",
                    "source_ranking": "source_ranking",
                    "finetune_plan": "finetune_plan",
                    "finetune_stages": "finetune_stages",
                    "dataset_summary": "dataset_summary",
                    "occlusion_flips": "occlusion_flips",
                    "label_noise_estimate": "label_noise_estimate",
                    "label_issues": "label_issues",
                    "model": "params:model",
                    "evaluation": "params:evaluation",
                },
                outputs="evaluation_report",
                name="write_report",
            ),
            Node(
                write_html_report,
                inputs=[
                    "evaluation_report",
                    "diagnosis",
                    "diagnosis_not_judged",
                    "params:evaluation",
                ],
                outputs="report_html",
                name="write_html_report",
            ),
            Node(
                write_diagnosis_junit,
                inputs=["diagnosis", "diagnosis_not_judged"],
                outputs="diagnosis_junit",
                name="write_diagnosis_junit",
            ),
            Node(
                enforce_fail_on,
                inputs=[
                    "diagnosis",
                    "evaluation_report",
                    "report_html",
                    "diagnosis_junit",
                    "params:evaluation",
                ],
                outputs=None,
                name="enforce_fail_on",
            ),
        ]
    )
