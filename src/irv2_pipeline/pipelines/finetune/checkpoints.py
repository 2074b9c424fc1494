"""Checkpoints during training, so a killed run resumes where it was.

A run's checkpoints live in ``<checkpoint_dir>/<key>/``, where the key hashes
everything that shapes the training (parameters, stages, manifests, the resized
files training reads, class names, the package version): a run with other parameters
or other images never resumes from them. A run's folder is deleted once its model file is saved
(``remove_finished_checkpoints``), not before: a run killed while saving the model
resumes with its final weights instead of training again.

The folder holds ``state.json`` and the weight files it names. Every file is written
under a temporary name and renamed into place, and ``state.json`` last, so a run
killed at any moment leaves the previous consistent checkpoint.

What a checkpoint costs the training thread: within a stage only the variables the
stage can change are saved (:func:`changing_variables`; the rest is in ``base``,
saved when the stage began), a role that holds the same arrays as another (the best
epoch being the latest) shares its file, and :meth:`CheckpointStore.save_in_background`
writes off the training thread: the caller hands over arrays already copied to the
host, and the next save waits for this one. Only the latest checkpoint and the files
it names are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from irv2_pipeline.atomic import replaced_atomically

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """Where training is: the stage, the epochs done in it, what came out so far.

    Attributes:
        stage_index: The stage being trained (all before it are done).
        epochs_done: Epochs of that stage done.
        adapted: Whether the stage's BatchNorm adaptation (``adapt``) is done.
        best_val_loss: The validation loss of the epoch whose weights the stage
            keeps: its lowest so far, or its last with
            ``early_stopping.restore_best_weights`` false.
        best_val_accuracy: The validation accuracy of that epoch.
        best_epoch: That epoch (1-based); 0 for none yet.
        lowest_val_loss: The stage's lowest validation loss so far.
        epochs_without_improvement: Epochs since it last fell (early stopping).
        history: One dict per epoch trained, all stages.
        stage_records: One dict per finished stage.
        selected_stage: The finished stage with the lowest validation loss so far,
            whose weights (``selected``) the run ends with; ``None`` before any.
        selected_val_loss: That stage's validation loss.
        found_rates: Stage index (as text) to its learning-rate range test: the
            summary, the rate used and the curve, so a resumed stage keeps its rate.
        files: Role (``base``, ``progress``, ``best``, ``optimizer``, ``selected``)
            to file name.
        saves: How many times the state was saved (names new files uniquely).
        finished: Every stage is done; ``base`` holds the final weights. Kept until
            the model file is saved (``hooks.FinishedCheckpointsHook``), so a run
            killed while saving it does not train again.
    """

    stage_index: int = 0
    epochs_done: int = 0
    adapted: bool = False
    best_val_loss: float | None = None
    best_val_accuracy: float | None = None
    best_epoch: int = 0
    lowest_val_loss: float | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stage_records: list[dict[str, Any]] = field(default_factory=list)
    selected_stage: int | None = None
    selected_val_loss: float | None = None
    found_rates: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    saves: int = 0
    finished: bool = False

    def next_stage(self, record: dict[str, Any]) -> None:
        """Closes the current stage with its record."""
        self.stage_records.append(record)
        self.stage_index += 1
        self.epochs_done = 0
        self.adapted = False
        self.best_val_loss = None
        self.best_val_accuracy = None
        self.best_epoch = 0
        self.lowest_val_loss = None
        self.epochs_without_improvement = 0


def remove_finished_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Deletes the checkpoint folders under ``root`` of runs that finished training.

    Returns:
        The folders deleted.
    """
    removed = []
    for state_file in sorted(Path(root).glob(f"*/{STATE_FILE}")):
        if json.loads(state_file.read_text()).get("finished"):
            shutil.rmtree(state_file.parent)
            removed.append(state_file.parent)
    return removed


class CheckpointStore:
    """The checkpoint folder of one training run (see the module docstring).

    Args:
        root: ``finetune.checkpoint_dir``.
        key: ``keys.content_key`` of everything that shapes the run.
    """

    def __init__(self, root: str | os.PathLike, key: str):
        self.folder = Path(root) / key
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def load(self) -> TrainingState | None:
        """The saved state, or ``None`` when there is nothing to resume."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = TrainingState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise RuntimeError(
                f"The checkpoint {path} is damaged ({exc}); delete {self.folder} to "
                "train from the start."
            ) from exc
        missing = [n for n in state.files.values() if not (self.folder / n).is_file()]
        if missing:
            raise RuntimeError(
                f"The checkpoint {path} names files that are gone ({missing}); delete "
                f"{self.folder} to train from the start."
            )
        return state

    def save(
        self,
        state: TrainingState,
        arrays: Mapping[str, Sequence[np.ndarray]],
    ) -> None:
        """Writes new weight files, then ``state.json``, then drops files it no longer names.

        Waits for a save still being written in the background first.

        Args:
            state: The state to save; its ``files`` are updated.
            arrays: Role to arrays for the roles that changed (``base``: the whole
                model; ``progress``: the stage's :func:`changing_variables`;
                ``best``: their best so far; ``optimizer``: the optimizer's
                variables; ``selected``: the whole model as the best stage so far
                left it). Roles not given keep their earlier file; a role given as an
                empty list is dropped; roles given the same list object share one
                file.
        """
        self.wait()
        self._write(state.saves + 1, json.loads(json.dumps(asdict(state))), arrays)
        self._record(state, arrays)

    def save_in_background(
        self,
        state: TrainingState,
        arrays: Mapping[str, Sequence[np.ndarray]],
    ) -> None:
        """:meth:`save` on a writer thread; returns once the previous save is done.

        ``state`` is copied now and ``arrays`` must not change until the save is
        written (pass arrays copied to the host, e.g. by :func:`host_copy`). A run
        killed before the write ends resumes from the previous checkpoint. Errors
        surface at the next :meth:`wait`, :meth:`save` or background save.
        """
        self.wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending = self._writer.submit(
            self._write, state.saves + 1, json.loads(json.dumps(asdict(state))), arrays
        )
        self._record(state, arrays)

    def wait(self) -> None:
        """Waits for the background save; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _record(
        self, state: TrainingState, arrays: Mapping[str, Sequence[np.ndarray]]
    ) -> None:
        """Updates ``state`` as :meth:`_write` updates the copy it saves."""
        state.saves += 1
        state.files = _named_files(
            state.saves, state.stage_index, state.epochs_done, state.files, arrays
        )

    def _write(
        self,
        saves: int,
        saved: dict[str, Any],
        arrays: Mapping[str, Sequence[np.ndarray]],
    ) -> None:
        """Writes the files of ``arrays``, then ``saved`` (a state as a dict) as
        ``state.json``, then drops files it no longer names."""
        self.folder.mkdir(parents=True, exist_ok=True)
        saved["saves"] = saves
        saved["files"] = _named_files(
            saves, saved["stage_index"], saved["epochs_done"], saved["files"], arrays
        )
        written: set[int] = set()
        for role, values in arrays.items():
            if values and id(values) not in written:
                _write_npz(self.folder / saved["files"][role], values)
                written.add(id(values))
        _write_text(self.folder / STATE_FILE, json.dumps(saved, indent=1))
        named = set(saved["files"].values()) | {STATE_FILE}
        for path in self.folder.iterdir():
            if path.name not in named:
                path.unlink()

    def copy_to(self, root: str | os.PathLike) -> CheckpointStore:
        """A store under ``root`` that starts from this one's checkpoint.

        A multi-worker run's other workers resume from the chief's checkpoint but
        write their own to a temporary folder: only the chief writes under the
        project's ``checkpoint_dir``.
        """
        copy = CheckpointStore(root, self.folder.name)
        state = self.load()
        if state is not None:
            copy.folder.mkdir(parents=True, exist_ok=True)
            for name in state.files.values():
                shutil.copy2(self.folder / name, copy.folder / name)
            _write_text(copy.folder / STATE_FILE, json.dumps(asdict(state), indent=1))
        return copy

    def arrays(self, state: TrainingState, role: str) -> list[np.ndarray] | None:
        """The arrays saved for ``role``, or ``None``."""
        self.wait()
        name = state.files.get(role)
        if name is None:
            return None
        with np.load(self.folder / name) as saved:
            return [saved[f"a{i}"] for i in range(len(saved.files))]


def _named_files(
    saves: int,
    stage_index: int,
    epochs_done: int,
    files: Mapping[str, str],
    arrays: Mapping[str, Sequence[np.ndarray]],
) -> dict[str, str]:
    """Role to file name after a save: a new name per save and written list (the
    file state.json names is never overwritten), none for a dropped role."""
    named = dict(files)
    tag = f"{saves:05d}-s{stage_index}e{epochs_done}"
    first_role: dict[int, str] = {}
    for role, values in arrays.items():
        if not values:
            named.pop(role, None)
            continue
        owner = first_role.setdefault(id(values), role)
        named[role] = f"{owner}-{tag}.npz"
    return named


def changing_variables(model: keras.Model) -> list[keras.Variable]:
    """The variables of ``model`` that training can change, in a fixed order.

    Those of its trainable layers: their trainable weights and their state
    (BatchNorm's moving statistics, which ``bn_policy: train`` updates). A frozen
    layer's weights stay as they were when the stage began, so a checkpoint within a
    stage saves only these; at the IRv2 top stage (from ``block8_1``) that is 43% of
    the model.
    """
    variables = []
    for layer in _leaf_layers(model):
        if layer.trainable:
            variables.extend(layer.weights)
    return variables


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(_leaf_layers(layer))
        else:
            leaves.append(layer)
    return leaves


def host_copy(variables: Sequence[keras.Variable]) -> list[np.ndarray]:
    """The variables' values as new host arrays (training may go on changing them)."""
    return [keras.ops.convert_to_numpy(v) for v in variables]


def restore_variables(
    variables: Sequence[keras.Variable], arrays: Sequence[np.ndarray], what: str
) -> None:
    """Assigns :func:`host_copy`'s arrays back, refusing ones saved by other code."""
    shapes = [tuple(v.shape) for v in variables]
    if [tuple(a.shape) for a in arrays] != shapes:
        raise RuntimeError(
            f"The checkpoint's {what} ({len(arrays)} arrays) do not match the "
            f"model's {len(variables)} variables: it was saved by other code."
        )
    for variable, value in zip(variables, arrays, strict=True):
        variable.assign(value)


def optimizer_arrays(optimizer: keras.optimizers.Optimizer) -> list[np.ndarray]:
    """The optimizer's variables (step count, moments, ...) as arrays."""
    return host_copy(optimizer.variables)


def restore_optimizer(
    optimizer: keras.optimizers.Optimizer, arrays: Sequence[np.ndarray]
) -> None:
    """Loads :func:`optimizer_arrays` into an optimizer built on the same variables."""
    if len(arrays) != len(optimizer.variables):
        raise RuntimeError(
            f"The checkpoint holds {len(arrays)} optimizer variables, the optimizer "
            f"has {len(optimizer.variables)}: it was saved by other code."
        )
    for variable, value in zip(optimizer.variables, arrays, strict=True):
        variable.assign(value)


def _write_npz(path: Path, arrays: Sequence[np.ndarray]) -> None:
    with replaced_atomically(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)})


def _write_text(path: Path, text: str) -> None:
    with replaced_atomically(path) as temporary:
        temporary.write_text(text)
