"""GeneratedImageFolderDataset: killed writes, foreign folders, incremental saves."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kedro.io import DatasetError
from PIL import Image

from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageJobs

NAMES = ("a", "b", "c", "d")


def solid_png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (colour, 255 - colour, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class SolidJob:
    """Solid-colour PNGs whose key is their colour."""

    colour: int
    outputs: dict[str, str] = field(default_factory=dict)
    rendered: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, colour: int) -> SolidJob:
        return cls(colour, {f"solid/{name}.png": f"colour {colour}" for name in NAMES})

    def render(self, wanted):
        self.rendered.extend(wanted)
        return {rel: solid_png(self.colour) for rel in wanted}


# Runs one save in a fresh process and kills it with SIGKILL at a chosen moment:
# halfway through writing the n-th image ("mid-write"), or right after the n-th
# image has replaced the old file ("after-replace").
KILLED_SAVE = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageJobs
    from tests.pipelines.augmentation.test_generated_images import SolidJob

    folder, colour, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    images = {"written": 0, "replaced": 0}
    write_bytes, replace = pathlib.Path.write_bytes, os.replace

    def write_half_then_die(path, content):
        if path.name.startswith(".generated_images"):
            return write_bytes(path, content)
        images["written"] += 1
        if mode == "mid-write" and images["written"] == n:
            write_bytes(path, content[: len(content) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return write_bytes(path, content)

    def replace_then_die(source, target):
        replace(source, target)
        if not str(target).endswith(".json"):
            images["replaced"] += 1
            if mode == "after-replace" and images["replaced"] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    pathlib.Path.write_bytes = write_half_then_die
    os.replace = replace_then_die
    GeneratedImageFolderDataset(path=folder).save(ImageJobs([SolidJob.of(colour)]))
    """
)


def killed_save(folder: Path, colour: int, mode: str, n: int) -> None:
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(folder), str(colour), mode, str(n)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -9, result.stderr[-2000:]


def test_a_save_writes_every_file_and_a_rerun_writes_none(tmp_path):
    dataset = GeneratedImageFolderDataset(path=str(tmp_path / "out"))
    assert not dataset.exists()
    dataset.save(ImageJobs([SolidJob.of(10)]))
    assert dataset.exists()
    folder = dataset.load()
    assert {p.name for p in (folder.root / "solid").iterdir()} == {
        f"{n}.png" for n in NAMES
    }

    again = SolidJob.of(10)
    dataset.save(ImageJobs([again]))
    assert again.rendered == []


def test_worker_processes_write_every_job(tmp_path):
    folder = tmp_path / "out"
    jobs = [
        SolidJob(colour, {f"solid/{colour}_{n}.png": str(colour) for n in NAMES})
        for colour in (10, 60, 110)
    ]
    dataset = GeneratedImageFolderDataset(path=str(folder))
    dataset.save(ImageJobs(jobs, workers=2))

    for colour in (10, 60, 110):
        for name in NAMES:
            path = folder / "solid" / f"{colour}_{name}.png"
            assert path.read_bytes() == solid_png(colour)
    repeat = [SolidJob(job.colour, job.outputs) for job in jobs]
    dataset.save(ImageJobs(repeat, workers=1))
    assert all(job.rendered == [] for job in repeat)  # all indexed by the first save


def test_a_write_killed_halfway_leaves_no_file_a_later_save_accepts(tmp_path):
    folder = tmp_path / "out"
    killed_save(folder, colour=50, mode="mid-write", n=3)

    leftovers = [
        p for p in (folder / "solid").iterdir() if p.name.startswith(".c.png.")
    ]
    assert len(leftovers) == 1  # the half-written third image, under a hidden name
    assert not (folder / "solid" / "c.png").exists()

    job = SolidJob.of(50)
    GeneratedImageFolderDataset(path=str(folder)).save(ImageJobs([job]))

    # Nothing of the killed run was taken as written, and its debris is gone.
    assert sorted(job.rendered) == [f"solid/{n}.png" for n in NAMES]
    assert sorted(p.name for p in (folder / "solid").iterdir()) == [
        f"{n}.png" for n in NAMES
    ]
    for name in NAMES:
        assert (folder / "solid" / f"{name}.png").read_bytes() == solid_png(50)


def test_a_file_replaced_by_a_killed_run_is_not_mistaken_for_the_old_one(tmp_path):
    folder = tmp_path / "out"
    dataset = GeneratedImageFolderDataset(path=str(folder))
    dataset.save(ImageJobs([SolidJob.of(10)]))
    # A run with another policy dies after replacing two files...
    killed_save(folder, colour=200, mode="after-replace", n=2)
    # ...and the first policy comes back: those two must be written again.
    job = SolidJob.of(10)
    dataset.save(ImageJobs([job]))

    # The killed run had withdrawn every entry it was about to replace from the
    # index before writing, so nothing of its output passes for the first policy.
    assert {"solid/a.png", "solid/b.png"} <= set(job.rendered)
    for name in NAMES:
        assert (folder / "solid" / f"{name}.png").read_bytes() == solid_png(10)


def test_files_no_longer_wanted_are_deleted(tmp_path):
    dataset = GeneratedImageFolderDataset(path=str(tmp_path / "out"))
    dataset.save(ImageJobs([SolidJob.of(10)]))
    fewer = SolidJob(10, {"solid/a.png": "colour 10"})
    dataset.save(ImageJobs([fewer]))
    assert [p.name for p in (tmp_path / "out" / "solid").iterdir()] == ["a.png"]

    dataset.save(ImageJobs([]))
    assert not (tmp_path / "out" / "solid").exists()
    assert dataset.exists()


def test_a_folder_it_did_not_write_is_never_touched(tmp_path):
    users = tmp_path / "my_photos"
    (users / "cats").mkdir(parents=True)
    (users / "cats" / "tom.jpg").write_bytes(b"a photo")

    dataset = GeneratedImageFolderDataset(path=str(users))
    with pytest.raises(DatasetError, match="was not written by this pipeline"):
        dataset.save(ImageJobs([SolidJob.of(10)]))
    assert [p.name for p in users.rglob("*")] == ["cats", "tom.jpg"]
    assert (users / "cats" / "tom.jpg").read_bytes() == b"a photo"


def test_paths_that_leave_the_folder_are_refused(tmp_path):
    dataset = GeneratedImageFolderDataset(path=str(tmp_path / "out"))
    for bad in ("../escape.png", "/tmp/abs.png", "a/.hidden.png"):
        with pytest.raises(DatasetError, match="not a plain relative path"):
            dataset.save(ImageJobs([SolidJob(1, {bad: "k"})]))
    assert not (tmp_path / "escape.png").exists()


def test_loading_before_the_first_save_says_so(tmp_path):
    with pytest.raises(DatasetError, match="has not been written yet"):
        GeneratedImageFolderDataset(path=str(tmp_path / "out")).load()
