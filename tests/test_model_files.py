"""Model files: safetensors with a checksum beside them, crash-safe as a pair, pickles refused."""

from __future__ import annotations

import pytest
import torch

import uqsynth._files
from uqsynth.errors import DataError
from uqsynth.model_files import checksum_path, load_state, load_tensors, save_state, save_tensors


def header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_a_header_length_that_looks_like_a_pickle_opcode_still_loads(tmp_path):
    """A header of 640 bytes starts the file with 0x80 0x02, pickle protocol 2's opening bytes."""
    path = tmp_path / "weights.safetensors"
    for padding in range(0, 800):
        save_tensors(path, {"w": torch.ones(2)}, {"note": "x" * padding})
        if header_length(path) == 640:
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    tensors, metadata = load_tensors(path, what="weights")
    assert torch.equal(tensors["w"], torch.ones(2))


def test_nested_state_round_trips_without_pickle(tmp_path):
    state = {"epoch": 3, "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 1e-3}]},
             "rng": [{"torch": torch.arange(4, dtype=torch.uint8), "gauss": None}]}
    save_state(tmp_path / "state.safetensors", state)
    loaded = load_state(tmp_path / "state.safetensors", what="state")
    assert loaded["epoch"] == 3 and loaded["optimizer"]["param_groups"] == [{"lr": 1e-3}]
    assert list(loaded["optimizer"]["state"]) == [0], "int keys stay ints"
    assert torch.equal(loaded["rng"][0]["torch"], torch.arange(4, dtype=torch.uint8))


class Killed(BaseException):
    """Stands for SIGKILL between writing the checksum file and renaming the model file into place."""


def test_kills_between_checksum_and_rename_twice_in_a_row_leave_a_file_that_verifies(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    save_tensors(path, {"w": torch.zeros(3)})
    real_replace = uqsynth._files.os.replace

    def replace(source, destination):
        if str(destination) == str(path):
            raise Killed
        real_replace(source, destination)

    monkeypatch.setattr(uqsynth._files.os, "replace", replace)
    for value in (1.0, 2.0):
        with pytest.raises(Killed):
            save_tensors(path, {"w": torch.full((3,), value)})
    monkeypatch.undo()
    tensors, _ = load_tensors(path, what="checkpoint")  # the first file, still accepted
    assert torch.equal(tensors["w"], torch.zeros(3))
    save_tensors(path, {"w": torch.ones(3)})
    assert len(checksum_path(path).read_text().splitlines()) == 1, "a completed save records its digest alone"


def test_a_file_without_its_checksum_or_with_other_bytes_is_refused(tmp_path):
    path = tmp_path / "generator.safetensors"
    save_tensors(path, {"w": torch.zeros(3)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its checksum"):
        load_tensors(path, what="weights")
    checksum_path(path).unlink()
    with pytest.raises(DataError, match="has no checksum file generator.safetensors.sha256"):
        load_tensors(path, what="weights")
