"""Job names per spec: what sensors and schedules request runs of, and `mlops status` reads."""

from mlops.spec import Spec

TAG_TRAINING = "mlops/training"  # every run of <spec>_training_job carries it


def training_job_name(spec: Spec) -> str:
    return f"{spec.name}_training_job"


def data_job_name(spec: Spec) -> str:
    return f"{spec.name}_data_job"


def training_set_job_name(spec: Spec) -> str:
    return f"{spec.name}_training_set_job"


def batch_predictions_job_name(spec: Spec) -> str:
    return f"{spec.name}_batch_predictions_job"


def scoring_job_name(spec: Spec) -> str:
    return f"{spec.name}_scoring_job"


def labels_job_name(spec: Spec) -> str:
    return f"{spec.name}_labels_job"
