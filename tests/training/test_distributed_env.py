"""torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), read in one place
(training.distributed.env_dist_info): a malformed one is refused in one line naming the variable, its value and what
was expected (train.py: a usage error before any work), not a KeyError/ValueError traceback; WORLD_SIZE unset or 1
is one process, as before."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers import ROOT

import train as train_script
from training import distributed

VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
NO_RANK = "WORLD_SIZE=2 but RANK is not set: launch with torchrun, or unset WORLD_SIZE for a single-process run"


@pytest.fixture
def launch_env(monkeypatch):
    """Sets the launch variables to the given dict (the others unset), for the test."""
    def set_env(values: dict) -> None:
        for name in VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    set_env({})
    return set_env


@pytest.mark.parametrize("env", [
    {}, {"WORLD_SIZE": ""}, {"WORLD_SIZE": "1"}, {"WORLD_SIZE": " 1 "},
    # one process: the other variables are not read, as before (a leftover RANK does not stop a plain run)
    {"WORLD_SIZE": "1", "RANK": "3", "LOCAL_RANK": "x", "MASTER_PORT": "0"}, {"RANK": "1", "LOCAL_RANK": "1"},
], ids=["unset", "empty", "one", "one-spaced", "one-with-stray-rank", "rank-without-world"])
def test_one_process_environments_are_one_process(launch_env, env):
    launch_env(env)
    assert distributed.env_dist_info() == distributed.DistInfo()
    assert distributed.init_from_env("cpu") == distributed.DistInfo() and not dist.is_initialized()
    assert train_script._world_size() == 1 and not train_script.machine_follower()


def test_a_torchrun_environment_is_read(launch_env):
    launch_env(TORCHRUN)
    assert distributed.env_dist_info() == distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    assert train_script._world_size() == 2 and train_script.machine_follower()
    launch_env({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "65535"})
    assert distributed.env_dist_info() == distributed.DistInfo(rank=0, world_size=2, local_rank=0)
    assert not train_script.machine_follower()


BAD = [
    ({"WORLD_SIZE": "2"}, NO_RANK),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer; expected an integer >= 1 (the number of processes, as "
                          "torchrun sets it; unset for a single process)"),
    ({"WORLD_SIZE": "2.0"}, "WORLD_SIZE='2.0' is not an integer; expected an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range; expected an integer >= 1"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE=-2 is out of range; expected an integer >= 1"),
    ({**TORCHRUN, "RANK": ""}, NO_RANK),
    ({**TORCHRUN, "RANK": "one"}, "RANK='one' is not an integer; expected an integer in [0, 1] (this process's rank "
                                  "among the WORLD_SIZE=2 processes)"),
    ({**TORCHRUN, "RANK": "2"}, "RANK=2 is out of range; expected an integer in [0, 1]"),
    ({**TORCHRUN, "RANK": "-1"}, "RANK=-1 is out of range; expected an integer in [0, 1]"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"},
     "WORLD_SIZE=2 but LOCAL_RANK is not set: launch with torchrun"),
    ({**TORCHRUN, "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is out of range; expected an integer in [0, 1] (this process's "
                                       "index on its machine)"),
    ({**TORCHRUN, "LOCAL_RANK": "a"}, "LOCAL_RANK='a' is not an integer; expected an integer in [0, 1]"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"},
     "WORLD_SIZE=2 but MASTER_ADDR is not set: launch with torchrun, or unset WORLD_SIZE for a single-process run"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"},
     "WORLD_SIZE=2 but MASTER_PORT is not set: launch with torchrun, or unset WORLD_SIZE for a single-process run"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer; expected an integer in [1, 65535] "
                                          "(the TCP port of the rank-0 process)"),
    ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0 is out of range; expected an integer in [1, 65535]"),
    ({**TORCHRUN, "MASTER_PORT": "65536"}, "MASTER_PORT=65536 is out of range; expected an integer in [1, 65535]"),
]

IDS = [f"{i}-{message.split(' ')[0].split('=')[0]}" for i, (_, message) in enumerate(BAD)]


@pytest.mark.parametrize("env, message", BAD, ids=IDS)
def test_a_malformed_torchrun_environment_is_named_in_one_line(launch_env, env, message):
    launch_env(env)
    with pytest.raises(ValueError) as e:
        distributed.env_dist_info()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:  # before torch.distributed reads the environment (a KeyError: 'RANK')
        distributed.init_from_env("cpu")
    assert message in str(e.value) and not dist.is_initialized()
    with pytest.raises(SystemExit) as stop:
        train_script._world_size()
    assert stop.value.code == f"train.py: {e.value}"
    assert not train_script.machine_follower()  # which process is the machine's first is unknown: each says it


@pytest.mark.parametrize("env, message", BAD[:3] + BAD[-2:], ids=IDS[:3] + IDS[-2:])
def test_train_py_refuses_a_malformed_torchrun_environment_as_a_usage_error(launch_env, capsys, env, message):
    """As the package's own environment variables: status 2, the usage and one error line, before any work (the
    --batch-size 1 check reads the process count: this comes first)."""
    launch_env(env)
    with pytest.raises(SystemExit) as stop:
        train_script.parse_args(["--batch-size", "1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the usage)
    assert stop.value.code == 2 and f": error: {message}" in last, last


def test_train_py_with_a_stray_world_size_exits_with_one_line_not_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--iterations", "1", "--device", "cpu",
                           "--out-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: error: {NO_RANK}", proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, env, message", [
    (["--batch-size", "5"], {}, "--batch-size 5 (global) must be divisible by the number of processes, 2"),
    (["--fused-ops"], {"DEEPLAB_OPS_BACKEND": "reference"},
     "DEEPLAB_OPS_BACKEND=reference cannot train under torchrun: the BatchNorms are synchronized across the 2 "
     "processes, which the reference backend does not do; unset it (the automatic choice takes cpu or cuda there), "
     "name cpu or cuda, or add --freeze-bn"),
], ids=["batch-size", "backend"])
def test_what_torchrun_cannot_train_is_a_flag_error_before_any_work(launch_env, monkeypatch, capsys, argv, env,
                                                                      message):
    # Found by a new user's audit: both reached the first step (the backend after the data and the model were built,
    # a traceback from every process), the batch size as a plain exit 1.
    launch_env({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0"})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        train_script.parse_args(["--device", "cpu", *argv])
    assert stop.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    # fine where it can run: one process, frozen BatchNorm (nothing synchronized), a batch the processes divide
    train_script.parse_args(["--device", "cpu", *argv, "--freeze-bn"] if env else ["--device", "cpu", "--batch-size",
                                                                                    "6"])
    launch_env({})
    train_script.parse_args(["--device", "cpu", *argv])


def test_a_process_group_that_does_not_form_stops_in_one_line(launch_env):
    # Under a multi-node launch a process that stopped before joining (a flag error on its node) left the others in
    # init_process_group for --dist-timeout, which then ended with torch's store traceback.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)})
    args = train_script.parse_args(["--device", "cpu", "--dist-timeout", "0.03"])
    with pytest.raises(SystemExit) as e:
        train_script._setup(args)
    message = str(e.value.code)
    assert message.startswith("train.py: the process group did not form within --dist-timeout 0.03 min: a process "
                              "stopped before joining"), message
    assert not dist.is_initialized()


def test_a_process_group_that_cannot_form_at_once_is_not_called_a_timeout(launch_env):
    # (its master port taken by another program: no --dist-timeout was waited)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        launch_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(s.getsockname()[1])})
        args = train_script.parse_args(["--device", "cpu", "--dist-timeout", "0.05"])
        with pytest.raises(SystemExit) as e:
            train_script._setup(args)
    assert str(e.value.code).startswith("train.py: could not form the process group ("), e.value.code
    assert not dist.is_initialized()


def test_a_resumed_batch_size_not_divisible_by_the_processes_says_where_it_came_from():
    # It said "--batch-size 1 (global) must be divisible by the number of processes, 2" for a batch size the
    # command never gave (read from a --freeze-bn run's checkpoint).
    from types import SimpleNamespace

    import torch

    from training.distributed import DistInfo

    args = SimpleNamespace(batch_size=3)
    with pytest.raises(SystemExit) as stop:
        train_script.cmd_train(args, torch.device("cpu"), DistInfo(0, 2, 0), ("run/last.pt", {}, {"batch_size": 3}))
    assert stop.value.code == (
        "--resume run/last.pt: --batch-size 3 (global), which comes from the checkpoint's run, must be divisible by "
        "the number of processes, 2: give --batch-size a multiple of 2, or resume with a number of processes that "
        "divides 3")
    with pytest.raises(SystemExit) as stop:
        train_script.cmd_train(args, torch.device("cpu"), DistInfo(0, 2, 0), ("run/last.pt", {}, {}))
    assert stop.value.code.startswith("--batch-size 3 (global) must be divisible by the number of processes, 2: give")
