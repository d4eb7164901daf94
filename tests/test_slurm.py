"""launch.py --slurm without a cluster: flags, the sbatch options they become, and what is refused
before anything is submitted. The real cluster's tests are in test_slurm_cluster.py."""

import os

import cloudpickle
import pytest

from bsdist import BsdistError, cli, config, slurm
from cifar_files import write_cifar
from paths import ROOT


def parse(*argv):
    return cli.parse_args(["configs/demo.yaml", "--slurm", *argv])


def demo(*overrides):
    return config.validate(config.load("configs/demo.yaml", list(overrides)), device_here=False)


def test_one_task_per_gpu_by_default_and_tasks_per_node_on_cpu():
    params = slurm.executor_parameters(parse("--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4"), demo(),
                                       "bsdist-x")
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["partition"] == "gpu" and params["job_name"] == "bsdist-x"
    assert params["cpus_per_task"] == 1 and params["time"] == 720 and params["signal_delay_s"] == 120
    assert slurm.world_size(parse("--nodes", "2", "--gpus-per-node", "4"), demo()) == 8
    assert slurm.world_size(parse(), demo()) == 1  # one GPU unless told otherwise

    cpu = slurm.executor_parameters(parse("--ntasks-per-node", "2", "--mem-gb", "8", "--slurm-extra",
                                          "reservation=mine", "--qos", "high", "--job-name", "mine"),
                                    demo("TRAIN.device", "cpu"), "bsdist-x")
    assert "gpus_per_node" not in cpu and cpu["ntasks_per_node"] == 2 and cpu["mem"] == "8GB"
    assert (cpu["additional_parameters"] == {"reservation": "mine"} and cpu["qos"] == "high"
            and cpu["job_name"] == "mine")
    assert "partition" not in cpu  # the cluster's default partition


def test_a_task_that_dies_ends_the_job_at_once():
    from submitit.slurm.slurm import _make_sbatch_string
    params = slurm.executor_parameters(parse("--nodes", "2", "--gpus-per-node", "4"), demo(), "bsdist-x")
    script = _make_sbatch_string("python -u -m submitit.core._submit /tmp/x", "/tmp/x", **params)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()
    with open("slurm/torchrun.sbatch") as f:
        assert "srun --kill-on-bad-exit=1 " in f.read()


def test_flags_that_contradict_or_are_out_of_range_are_refused():
    with pytest.raises(BsdistError, match="one task per GPU"):
        slurm.tasks_per_node(parse("--gpus-per-node", "4", "--ntasks-per-node", "2"), demo())
    # CPU tasks asked for while TRAIN.device auto means a GPU per task: the hint is the device, not the flag
    with pytest.raises(BsdistError, match="asks for CPU tasks.*set TRAIN.device cpu \\(or --gpus-per-node 0\\)"):
        slurm.tasks_per_node(parse("--ntasks-per-node", "2"), demo())
    assert slurm.tasks_per_node(parse("--ntasks-per-node", "2", "--gpus-per-node", "0"), demo()) == 2
    for argv, message in ((["--nodes", "0"], "--nodes must be at least 1"),
                          (["--gpus-per-node", "-1"], "--gpus-per-node must be 0 or more"),
                          (["--slurm-extra", "reservation"], "must be KEY=VALUE"),
                          (["--slurm-extra=--reservation=x"], "must be KEY=VALUE")):
        with pytest.raises(BsdistError, match=message):
            slurm.check_arguments(parse(*argv))


def test_slurm_flags_without_slurm_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["configs/demo.yaml", "--partition", "gpu"])
    assert exit_.value.code == 2
    assert "--partition is a SLURM option: add --slurm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--report", "runs", "--slurm"])


def run_cli(capsys, *argv):
    code = cli.run(list(argv))
    return code, capsys.readouterr()


def test_the_config_is_checked_for_the_job_s_world_size_before_submitting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm, "_executor", lambda *a: pytest.fail("submitted"))
    code, out = run_cli(capsys, "configs/demo.yaml", "--slurm", "--gpus-per-node", "3", "DEFAULT.savedir",
                        str(tmp_path))
    assert code == 2 and out.err.strip() == ("error: DATASET.batch_size 64 does not divide by the 3 processes; "
                                             "use a multiple of 3")
    code, out = run_cli(capsys, "configs/demo.yaml", "--slurm", "OPTIMIZER.lr", "-1", "DEFAULT.savedir", str(tmp_path))
    assert code == 2 and out.err.startswith("error: OPTIMIZER.lr")
    assert os.listdir(tmp_path) == []


def test_the_readme_s_command_without_a_config_submits_the_defaults(tmp_path, capsys, monkeypatch):
    write_cifar(str(tmp_path / "data"), 10, train_per_class=100)  # the defaults' DATASET.datadir ./data, here
    monkeypatch.chdir(tmp_path)
    submitted = []
    monkeypatch.setattr(slurm, "submit", lambda args, cfg: submitted.append((args, cfg)) or 0)
    code, out = run_cli(capsys, "--slurm", "--partition", "gpu")
    assert code == 0 and out.out.splitlines()[0].endswith(f"] no CONFIG given: {cli.DEFAULTS}"), out
    (args, cfg), = submitted
    default_yaml = config.load(os.path.join(ROOT, "configs", "default.yaml"))
    assert args.partition == "gpu" and cfg == config.validate(default_yaml, device_here=False)


def test_device_checks_belong_to_the_nodes_not_the_login_node():
    # a login node without a GPU may submit TRAIN.device cuda; the nodes check it when the job starts
    assert demo("TRAIN.device", "cuda").TRAIN.device == "cuda"


def test_without_sbatch_the_error_says_where_to_submit_from(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    code, out = run_cli(capsys, "configs/demo.yaml", "--slurm", "TRAIN.device", "cpu", "DEFAULT.savedir", str(tmp_path))
    assert code == 2 and out.err.startswith("error: sbatch not found") and "slurm/dev-cluster.sh up" in out.err
    assert os.listdir(tmp_path) == []  # no run directory


def test_the_task_pickles_and_its_checkpoint_is_a_fresh_task_for_the_same_run():
    cfg = demo("TRAIN.device", "cpu")
    task = cloudpickle.loads(cloudpickle.dumps(slurm.SlurmTask(cfg)))
    requeued = task.checkpoint()
    assert isinstance(requeued.function, slurm.SlurmTask) and requeued.function is not task
    assert requeued.function.cfg == cfg and requeued.args == () and requeued.kwargs == {}


def test_every_submission_gets_a_new_folder_inside_the_run_directory(tmp_path):
    first, second = slurm.submission_folder(str(tmp_path)), slurm.submission_folder(str(tmp_path))
    assert first != second and os.path.dirname(first) == str(tmp_path / "slurm")


def test_waiting_on_a_job_slurm_can_never_start_cancels_it_with_the_reason(tmp_path, monkeypatch):
    """squeue and scancel stand in for a cluster whose node offers fewer CPUs than the job asks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho PartitionConfig\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/cancelled\n")
    for tool in ("squeue", "scancel"):
        os.chmod(bin_dir / tool, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    class PendingForever:
        job_id, num_tasks = "4242", 2

        def task(self, i):
            return self

        def done(self, force_check=False):
            return False
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(BsdistError, match=r"job 4242 can never start: SLURM holds it pending \(PartitionConfig: "
                                          r".*cancelled.*--cpus-per-task.*--partition$"):
        slurm.wait_for(PendingForever(), str(run_dir))
    assert (tmp_path / "cancelled").read_text().strip() == "4242"
    (run_dir / "last.pt").touch()
    with pytest.raises(BsdistError, match="TRAIN.resume auto to continue from last.pt"):
        slurm.wait_for(PendingForever(), str(run_dir))


def test_the_dev_cluster_counts_the_machine_s_cpus_whatever_omp_num_threads_says():
    # nproc honours OMP_NUM_THREADS: with 1, the node registered one CPU and a 2-task job pended forever
    import subprocess
    with open(os.path.join(ROOT, "slurm", "dev-cluster.sh")) as f:
        function = next(line for line in f if line.startswith("real_cpus()"))
    counted = subprocess.run(["bash", "-c", f"{function}\nreal_cpus"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, check=True).stdout.strip()
    assert int(counted) == len(os.sched_getaffinity(0))
