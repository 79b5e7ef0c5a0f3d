"""Seeds are checked once, by the settings schema's range (0 <= seed < 2**32), wherever one is taken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.bnn.limits import SEED_LIMIT, derived_seed
from common.errors import HyBNNError
from common.federated.settings import setting

REPO = Path(__file__).resolve().parents[1]
HYBNN = str(Path(sys.executable).parent / "hybnn")


@pytest.mark.parametrize("command", [["federate"], ["continual"], ["train", "--task", "0v1"], ["pretrain"]])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_one_line_and_exit_2(command, seed, tmp_path):
    proc = subprocess.run([HYBNN, *command, "--seed", seed, "--out", str(tmp_path / "out"),
                           "--encoder", str(tmp_path / "no-encoder")] if command[0] != "pretrain" else
                          [HYBNN, *command, "--seed", seed, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"hybnn {command[0]}: error:") and f"seed={seed}" in lines[0]
    assert "4294967295" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_run_config_and_the_library_share_the_one_range():
    from common.bnn.training import TrainConfig

    for bad in (-1, SEED_LIMIT):
        with pytest.raises(HyBNNError, match="0 <= 4294967295"):
            setting("seed").parse(bad)
        with pytest.raises(HyBNNError, match="0 <= 4294967295"):
            TrainConfig(seed=bad)
    assert TrainConfig(seed=SEED_LIMIT - 1).seed == SEED_LIMIT - 1


def test_derived_seeds_stay_in_range_and_keep_the_small_ones():
    assert derived_seed(5, 7) == 12
    assert derived_seed(SEED_LIMIT - 1, 3) == 2
    # A client's training seed (client/client_app.py) at the largest run seed is a valid seed too.
    assert 0 <= derived_seed((SEED_LIMIT - 1) * 100_003, 20 * 101 + 9) < SEED_LIMIT
