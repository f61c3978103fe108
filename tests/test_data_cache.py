"""The run reads its test and calibration subjects once (``data.cache_mb``), and gets the same results."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_training import TINY

from uqsynth.cli import main
from uqsynth.data.base import CachedDataset, Dataset, SubjectVolumes, volumes_bytes
from uqsynth.data.phantom import PhantomDataset


class _Counting(Dataset):
    """Subjects of random volumes of ``shape``, counting the reads of each."""

    def __init__(self, ids, shape=(4, 4, 4)):
        self.ids, self.shape, self.reads = list(ids), shape, Counter()

    def subject_ids(self):
        return self.ids

    def load(self, subject_id):
        self.reads[subject_id] += 1
        rng = np.random.default_rng(self.ids.index(subject_id))
        source = rng.random(self.shape, dtype=np.float32)
        return SubjectVolumes(subject_id, source, source * 2, source > 0.5, np.eye(4), warnings=["looks odd"])


def test_a_kept_subject_is_read_once_and_each_load_gets_its_own_copy():
    counting = _Counting(["a", "b"])
    cached = CachedDataset(counting, keep=["a"], max_bytes=2**20)
    first = cached.load("a")
    first.source[:] = -1
    first.warnings.append("changed by a consumer")
    again = cached.load("a")
    assert counting.reads["a"] == 1
    assert (again.source >= 0).all() and again.warnings == ["looks odd"]
    np.testing.assert_array_equal(again.target, counting.load("a").target)
    for _ in range(3):
        cached.load("b")
    assert counting.reads["b"] == 3  # not one to keep: every read goes through


def test_the_budget_drops_the_least_recently_used_subject_and_zero_keeps_nothing():
    counting = _Counting(["a", "b", "c"])
    one = volumes_bytes(counting.load("a"))
    counting.reads.clear()
    cached = CachedDataset(counting, keep=["a", "b", "c"], max_bytes=2 * one)
    for subject_id in ["a", "b", "a", "c", "a", "b"]:  # c drops b (a was used last), b then drops c
        cached.load(subject_id)
    assert counting.reads == Counter({"a": 1, "b": 2, "c": 1})
    nothing = CachedDataset(_Counting(["a"]), keep=["a"], max_bytes=one - 1)  # a subject over the budget
    nothing.load("a"), nothing.load("a")
    assert nothing.dataset.reads["a"] == 2


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """The tiny run with held-out calibration, with and without the cache: its metrics and each subject's reads."""
    root = tmp_path_factory.mktemp("cache")
    config = root / "tiny.toml"
    config.write_text(TINY.replace("subjects = 3", "subjects = 5")
                      + '\n[calibration]\nsubjects = "held_out"\nheld_out_fraction = 0.2\n'
                      + 'calibrators = ["isotonic", "conformal"]\n')
    load, runs = PhantomDataset.load, {}
    for cache_mb in (2048, 0):
        counted = Counter()

        def counting_load(self, subject_id, counted=counted):
            counted[subject_id] += 1
            return load(self, subject_id)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(PhantomDataset, "load", counting_load)
            out = root / f"cache{cache_mb}"
            assert main(["run", str(config), "--out", str(out), "--device", "cpu",
                         "--set", f"data.cache_mb={cache_mb}"]) == 0
        split = json.loads((out / "split.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        runs[cache_mb] = split, metrics, counted
    runs["dir"] = root / "cache2048"
    return runs


def test_a_run_reads_each_subject_once_and_its_figures_do_not_change(reads):
    split, metrics, counted = reads[2048]
    assert set(counted) == {*split["train"], *split["test"], *split["calibration"]}
    assert set(counted.values()) == {1}
    uncached_split, uncached, counted_again = reads[0]
    assert uncached_split["test"] == split["test"] and uncached_split["calibration"] == split["calibration"]
    assert all(counted_again[s] > 1 for s in [*split["test"], *split["calibration"]])
    assert {k: v for k, v in uncached.items() if k != "timing"} == {k: v for k, v in metrics.items() if k != "timing"}


def test_report_reads_each_test_subject_once(reads, tmp_path, monkeypatch):
    split, metrics, _ = reads[2048]
    counted, load = Counter(), PhantomDataset.load

    def counting_load(self, subject_id):
        counted[subject_id] += 1
        return load(self, subject_id)

    monkeypatch.setattr(PhantomDataset, "load", counting_load)
    assert main(["report", str(reads["dir"])]) == 0
    assert counted == Counter(dict.fromkeys(split["test"], 1))
    again = json.loads((reads["dir"] / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "timing"} == {k: v for k, v in metrics.items() if k != "timing"}
