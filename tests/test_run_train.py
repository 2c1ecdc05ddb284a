"""run_train.sh: the config from $CONFIG_FILE, and LOG_RANK choosing whose output is shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "run_train.sh"


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_config_file_from_the_environment_and_log_rank(tmp_path):
    (tmp_path / "job.toml").write_text('[model]\nname = "llama"\n[training]\nsteps = 7\n')
    env = {**os.environ, "CONFIG_FILE": "job.toml", "LOG_RANK": "1", "NGPU": "2", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), "--print-config", "--training.seed", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    shown = [line for line in out.splitlines() if line.startswith("[rank")]
    assert shown and all(line.startswith("[rank1]:") for line in shown), out[-3000:]
    config = [line.removeprefix("[rank1]:") for line in shown]
    assert {'name = "llama"', "steps = 7", "seed = 3"} <= set(config)
