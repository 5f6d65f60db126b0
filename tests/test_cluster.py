"""The cluster launchers render the right commands, scripts and manifests (--dry-run); no cluster."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys

import pytest
import yaml

from launch.cluster import dataflow, k8s, local, slurm, tpu_pod
from launch.cluster.common import job_argv


def dry_run(module, *argv: str) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert module.main(["--dry-run", *argv]) == 0
  return out.getvalue()


def test_job_argv_passes_overrides_as_config_flags():
  args = argparse.Namespace(job="train", config="configs/synthetic.py", workdir="/shared/w",
                            set=["mesh.model=4", "train.batch_size=8192"])
  assert job_argv(args) == ["python3", "-m", "launch.train", "--workdir=/shared/w",
                            "--config=configs/synthetic.py", "--config.mesh.model=4",
                            "--config.train.batch_size=8192"]
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    job_argv(argparse.Namespace(job="train", config="c.py", workdir="w", set=["mesh.model"]))
  with pytest.raises(SystemExit, match="--workdir is required"):
    job_argv(argparse.Namespace(job="train", config="c.py", workdir=None, set=[]))


# ----------------------------------------------------------------------------- TPU pods


def tpu_commands(action: str, *extra: str) -> list[list[str]]:
  text = dry_run(tpu_pod, action, "--name=tt", "--zone=us-central2-b", "--project=proj", *extra)
  return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def test_tpu_pod_up_creates_copies_and_starts_on_all_workers():
  cmds = tpu_commands("up", "--accelerator=v4-32", "--spot", "--workdir=/mnt/shared/runs/tt",
                      "--set", "mesh.model=4", "--jax_version=0.9.0")
  create, tar, scp, install, start = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tt"]
  assert {"--accelerator-type=v4-32", "--zone=us-central2-b", "--project=proj", "--spot"} <= set(create)
  assert tar[:2] == ["tar", "-czf"] and "--exclude=.venv" in tar and tar[-1] == "."
  assert scp[4] == "scp" and scp[6] == "tt:~/two_tower-src.tar.gz" and "--worker=all" in scp
  assert install[4] == "ssh" and "--worker=all" in install
  install_cmd = next(a for a in install if a.startswith("--command="))
  assert "pip install" in install_cmd and "jax[tpu]==0.9.0" in install_cmd
  assert start[4] == "ssh" and "--worker=all" in start
  remote = next(a for a in start if a.startswith("--command="))[len("--command="):]
  # Detached from the ssh session (setsid nohup, stdin closed), its pid kept for `stop`.
  assert remote.startswith("cd ~/two_tower && (setsid nohup ")
  assert remote.endswith("< /dev/null & echo $! > ~/two_tower/job.pid)")
  words = shlex.split(remote)
  assert words[words.index("nohup") + 1:words.index(">")] == [
      "python3", "-m", "launch.train", "--workdir=/mnt/shared/runs/tt",
      "--config=configs/synthetic.py", "--config.mesh.model=4"]


def test_tpu_pod_logs_stop_delete():
  (logs,) = tpu_commands("logs", "--worker=3")
  assert "--worker=3" in logs and "--command=tail -n +1 -F ~/two_tower/job.log" in logs
  (stop,) = tpu_commands("stop")
  assert "--worker=all" in stop and any("kill $(cat ~/two_tower/job.pid)" in a for a in stop)
  (delete,) = tpu_commands("delete")
  assert delete[4:6] == ["delete", "tt"] and "--quiet" in delete


def test_tpu_pod_start_needs_a_workdir():
  with pytest.raises(SystemExit, match="--workdir"):
    tpu_commands("start")

# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_one_process_per_node(tmp_path):
  script = dry_run(slurm, "--nodes=4", "--gpus_per_node=8", "--partition=a100", "--time=02:00:00",
                   "--venv=/shared/venv", "--workdir=/shared/runs/tt", "--set", "mesh.model=8")
  directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
  assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=a100",
          "--time=02:00:00", "--exclusive"} <= set(directives)
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script  # one process drives 8 GPUs
  assert "source /shared/venv/bin/activate" in script
  srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
  assert "--kill-on-bad-exit=1" in srun
  assert srun[srun.index("-m") + 1:] == ["launch.train", "--workdir=/shared/runs/tt",
                                         "--config=configs/synthetic.py", "--config.mesh.model=8"]
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid shell


def test_slurm_script_one_process_per_gpu():
  script = dry_run(slurm, "--nodes=2", "--gpus_per_node=4", "--processes_per_node=4", "--port=7777",
                   "--workdir=/w")
  assert "#SBATCH --ntasks-per-node=4" in script
  assert "JAX_LOCAL_DEVICE_IDS" not in script  # JAX gives each process its SLURM_LOCALID GPU
  assert "export JAX_COORDINATOR_PORT=7777" in script
  with pytest.raises(SystemExit, match="must divide"):
    dry_run(slurm, "--gpus_per_node=8", "--processes_per_node=3", "--workdir=/w")

# ----------------------------------------------------------------------------- Kubernetes


def k8s_docs(*argv: str) -> list[dict]:
  return list(yaml.safe_load_all(dry_run(k8s, "--image=reg/tt:1", "--workdir=/mnt/shared/w", *argv)))


def _env(container: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_k8s_indexed_job_and_headless_service():
  service, job = k8s_docs("--name=tt", "--num_processes=4", "--gpus_per_process=8", "--pvc=runs",
                          "--set", "mesh.model=8", "--port=9999")
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  assert service["spec"]["publishNotReadyAddresses"] is True
  assert service["spec"]["selector"] == {"job-name": "tt"}  # the label Kubernetes puts on Job pods
  spec = job["spec"]
  assert (job["kind"], spec["completionMode"], spec["completions"], spec["parallelism"],
          spec["backoffLimit"]) == ("Job", "Indexed", 4, 4, 0)
  pod = spec["template"]["spec"]
  assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
  (container,) = pod["containers"]
  env = _env(container)
  # Pod i of an Indexed Job is <job>-<i>.<subdomain>: process 0 is tt-0.tt.
  assert env["JAX_COORDINATOR_ADDRESS"] == "tt-0.tt:9999" and env["JAX_NUM_PROCESSES"] == "4"
  assert env["JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath": k8s.INDEX_ANNOTATION}}
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  assert container["command"] == ["python", "-m", "launch.train", "--workdir=/mnt/shared/w",
                                  "--config=configs/synthetic.py", "--config.mesh.model=8"]
  assert {"name": "shared", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]


def test_k8s_jobset_for_tpu_slices():
  (jobset,) = k8s_docs("--kind=jobset", "--name=tt", "--num_processes=4",
                       "--tpu=tpu-v5-lite-podslice", "--tpu_topology=4x4")
  assert jobset["apiVersion"].startswith("jobset.x-k8s.io/") and jobset["kind"] == "JobSet"
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  (rjob,) = jobset["spec"]["replicatedJobs"]
  pod = rjob["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
  env = _env(pod["containers"][0])
  # JobSet pods are <jobset>-<replicated job>-<job index>-<pod index>.<jobset>.
  assert env["JAX_COORDINATOR_ADDRESS"] == f"tt-{rjob['name']}-0-0.tt:8476"
  assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}


def test_k8s_cronjob_runs_the_nightly_job_one_at_a_time():
  (cron,) = k8s_docs("--kind=cronjob", "--name=tt-nightly", "--pvc=runs", "--schedule=30 2 * * *",
                     "--env", "XLA_FLAGS=--xla_cpu_multi_thread_eigen=true")
  assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
  spec = cron["spec"]
  assert spec["schedule"] == "30 2 * * *" and spec["timeZone"] == "Etc/UTC"
  assert spec["concurrencyPolicy"] == "Forbid"  # never two days at once
  job = spec["jobTemplate"]["spec"]
  # A crash is retried (a rerun finishes the day); bad input or a failed gate (exit 2) is final.
  assert job["backoffLimit"] == 2
  (rule,) = job["podFailurePolicy"]["rules"]
  assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
  pod = job["template"]["spec"]
  assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
  (container,) = pod["containers"]
  assert container["command"] == ["python", "-m", "launch.nightly", "--workdir=/mnt/shared/w",
                                  "--config=configs/nightly.py", "--date=yesterday"]
  assert _env(container) == {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}  # one process
  assert {"name": "shared", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]
  assert {"name": "shared", "mountPath": k8s.SHARED_MOUNT} in container["volumeMounts"]
  with pytest.raises(SystemExit, match="one process"):
    k8s.main(["--dry-run", "--kind=cronjob", "--image=i", "--workdir=/w", "--num_processes=2"])
  with pytest.raises(SystemExit, match="needs --num_processes"):
    k8s.main(["--dry-run", "--image=i", "--workdir=/w"])


def test_nightly_date_names_resolve_in_utc():
  import datetime
  from launch.nightly import resolve_date
  day = datetime.date(2026, 3, 1)
  assert resolve_date("yesterday", day) == "2026-02-28"
  assert resolve_date("today", day) == "2026-03-01"
  assert resolve_date("2026-01-05", day) == "2026-01-05"


# ----------------------------------------------------------------------------- local processes


def test_local_launcher_sets_the_distributed_environment():
  lines = dry_run(local, "--num_processes=3", "--devices_per_process=2", "--port=4567", "--",
                  "python", "-m", "launch.train", "--workdir=/tmp/w").splitlines()
  assert lines[-1] == "wait" and len(lines) == 4
  for pid, line in enumerate(lines[:3]):
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:-5])
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", str(pid))
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert words[-5:] == ["python", "-m", "launch.train", "--workdir=/tmp/w", "&"]


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
  # Process 1 fails at once; process 0 would sleep for a minute and is stopped instead.
  script = "import os, sys, time; pid = int(os.environ['JAX_PROCESS_ID']); print('hello', pid); " \
           "sys.exit(3) if pid == 1 else time.sleep(60)"
  out = io.StringIO()
  code = local.launch([sys.executable, "-c", script], num_processes=2, out=out, grace_s=2.0)
  assert code == 3
  assert "[p1] hello 1" in out.getvalue() and "[p0] hello 0" in out.getvalue()


# ----------------------------------------------------------------------------- Beam (Dataflow, Flink, Spark)


def beam_commands(*argv: str) -> list[list[str]]:
  text = dry_run(dataflow, "--config=configs/logs.py", "--workdir=gs://b/runs/tt", *argv)
  return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def _options(argv: list[str]) -> dict[str, str]:
  flag = next(a for a in argv if a.startswith("--beam_options="))[len("--beam_options="):]
  return dict(option[2:].partition("=")[::2] for option in shlex.split(flag))


def test_dataflow_builds_the_wheel_then_prepares_on_dataflow():
  wheel, prepare = beam_commands("--project=proj", "--region=us-central1", "--bucket=gs://b/",
                                 "--max_workers=32", "--set", "data.data_dir=gs://b/data")
  assert wheel == ["python3", "-m", "pip", "wheel", "--no-deps", "--wheel-dir=dist", "."]
  assert prepare[:6] == ["python3", "-m", "launch.prepare_data", "--workdir=gs://b/runs/tt",
                         "--config=configs/logs.py", "--config.data.data_dir=gs://b/data"]
  assert "--beam_runner=DataflowRunner" in prepare
  options = _options(prepare)
  assert options["project"] == "proj" and options["region"] == "us-central1"
  assert options["temp_location"] == "gs://b/tmp" and options["staging_location"] == "gs://b/staging"
  assert (options["num_workers"], options["max_num_workers"]) == ("4", "32")
  assert options["extra_package"] == "dist/two_tower-0.1.0-py3-none-any.whl"
  assert "sdk_container_image" not in options


def test_dataflow_with_an_image_builds_nothing():
  (prepare,) = beam_commands("--project=proj", "--region=r", "--bucket=gs://b", "--image=reg/tt:1")
  options = _options(prepare)
  assert options["sdk_container_image"] == "reg/tt:1" and "extra_package" not in options


def test_dataflow_needs_project_region_and_a_gs_bucket():
  with pytest.raises(SystemExit, match="--project, --region and --bucket"):
    dataflow.main(["--dry-run", "--workdir=gs://b/w", "--project=p"])
  with pytest.raises(SystemExit, match="must be a gs:// path"):
    dataflow.main(["--dry-run", "--workdir=gs://b/w", "--project=p", "--region=r", "--bucket=/tmp"])


@pytest.mark.parametrize("runner,master,expected", [
    ("flink", "--flink_master=fl:8081", ("FlinkRunner", "flink_master", "fl:8081")),
    ("spark", "--spark_master=spark://sp:7077", ("SparkRunner", "spark_master_url", "spark://sp:7077"))])
def test_flink_and_spark_run_the_image_on_the_cluster(runner, master, expected):
  (prepare,) = beam_commands(f"--runner={runner}", master, "--image=reg/tt:1", "--parallelism=8")
  name, key, value = expected
  assert f"--beam_runner={name}" in prepare
  options = _options(prepare)
  assert options[key] == value and options["parallelism"] == "8"
  assert (options["environment_type"], options["environment_config"]) == ("DOCKER", "reg/tt:1")
  with pytest.raises(SystemExit, match="needs --image"):
    dataflow.main(["--dry-run", "--workdir=w", f"--runner={runner}", master])
