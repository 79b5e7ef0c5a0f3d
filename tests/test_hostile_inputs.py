"""Hostile and careless inputs met through the command line: files that are not files,
credentials that do not belong together, values at the edge of their range.

Each case expects one clear error line and exit status 2 (``cli`` asserts no traceback),
or the correct result; never a hang, a silent wrong answer or a lost earlier file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import data
from tests.test_inputs import cli, data_root_with


# ------------------------------------------------------------------ MNIST files that are not files
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["folder", "fifo"])
@pytest.mark.parametrize("key", ["test-images", "train-labels"])
def test_an_idx_path_that_is_not_a_regular_file_is_refused_without_reading_it(kind, key, tmp_path, mnist_root, capsys):
    """A folder would be a traceback; a pipe (or a link to /dev/zero) would block or read forever."""
    name = data.IDX_FILES[key]
    root = data_root_with(tmp_path, mnist_root, {})
    target = data.raw_dir(root) / name
    target.unlink()
    if kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)
    rc, error = cli(capsys, "data", "--data-root", root)
    assert rc == 2
    assert str(target) in error and "not a regular file" in error
    assert f"hybnn data --data-root {root}" in error
