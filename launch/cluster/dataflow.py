"""Data preparation on a Beam cluster: Google Cloud Dataflow, or a Flink or Spark cluster. Renders
(and runs) the `python -m launch.prepare_data --beam_runner=...` command of pipelines/beam_prepare.py.

  python -m launch.cluster.dataflow --project=P --region=us-central1 --bucket=gs://B \\
      --config=configs/my_logs.py --workdir=gs://B/runs/tt --max_workers=64 [--dry-run]
  python -m launch.cluster.dataflow --runner=flink --flink_master=HOST:8081 --image=IMAGE ...
  python -m launch.cluster.dataflow --runner=spark --spark_master=spark://HOST:7077 --image=IMAGE ...

Dataflow: the command runs on this machine (the launcher: it checks the input files' schemas and
submits the job), the pipeline on Dataflow's workers, which need this code: by default a wheel of
this repository built first (`pip wheel --no-deps`, passed as --extra_package; the workers then
install its dependencies from PyPI at start-up), or --image, a container with the repository and
its dependencies installed (Beam's `--sdk_container_image`; faster start-up, the choice for
repeated runs). Input files (data.logs.files) and the prepared data (data.data_dir, else the
work directory's data/) must be on gs://; the launcher needs `pip install -e '.[beam]'
'apache-beam[gcp]' gcsfs`. Autoscaling grows the job from --num_workers up to --max_workers; see
docs/data_preparation.md for sizing a run and its cost.

Flink and Spark run Beam's portable runners: the launcher starts a job server for the cluster
(--flink_master, --spark_master) and the workers run --image (Beam's SDK harness container with
this repository installed), as Docker containers (--environment_type=DOCKER), with --parallelism
tasks. Inputs and outputs must be on storage every task sees (gs://, s3://, hdfs://).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from launch.cluster import common
from launch.cluster.common import Command

RUNNERS = {"dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
WHEEL = "two_tower-0.1.0-py3-none-any.whl"


def beam_options(args: argparse.Namespace) -> list[str]:
  """The runner's options (--beam_options of launch.prepare_data)."""
  if args.runner == "dataflow":
    if not (args.project and args.region and args.bucket):
      raise SystemExit("--runner=dataflow needs --project, --region and --bucket (gs://...)")
    if not args.bucket.startswith("gs://"):
      raise SystemExit(f"--bucket must be a gs:// path, got {args.bucket!r}")
    bucket = args.bucket.rstrip("/")
    options = [f"--project={args.project}", f"--region={args.region}",
               f"--job_name={args.name}", f"--temp_location={bucket}/tmp",
               f"--staging_location={bucket}/staging",
               f"--num_workers={args.num_workers}", f"--max_num_workers={args.max_workers}",
               "--autoscaling_algorithm=THROUGHPUT_BASED",
               f"--worker_machine_type={args.machine_type}", f"--disk_size_gb={args.disk_gb}"]
    if args.image:
      options.append(f"--sdk_container_image={args.image}")
    else:
      options.append(f"--extra_package={os.path.join(args.wheel_dir, WHEEL)}")
    if args.service_account:
      options.append(f"--service_account_email={args.service_account}")
    return options
  if not args.image:
    raise SystemExit(f"--runner={args.runner} needs --image: the SDK harness container with this "
                     "repository installed, which the cluster's workers run")
  if args.runner == "flink":
    if not args.flink_master:
      raise SystemExit("--runner=flink needs --flink_master=HOST:PORT (the Flink REST endpoint)")
    options = [f"--flink_master={args.flink_master}"]
  else:
    if not args.spark_master:
      raise SystemExit("--runner=spark needs --spark_master=spark://HOST:PORT")
    options = [f"--spark_master_url={args.spark_master}"]
  return options + ["--environment_type=DOCKER", f"--environment_config={args.image}",
                    f"--parallelism={args.parallelism}", f"--job_name={args.name}"]


def commands(args: argparse.Namespace) -> list[Command]:
  if not args.workdir:
    raise SystemExit("--workdir is required (on gs:// for Dataflow)")
  options = beam_options(args)
  out = []
  if args.runner == "dataflow" and not args.image:
    out.append(Command((args.python, "-m", "pip", "wheel", "--no-deps", f"--wheel-dir={args.wheel_dir}",
                        "."), description="the code the workers install"))
  argv = [args.python, "-m", "launch.prepare_data", f"--workdir={args.workdir}",
          f"--config={args.config}"]
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.data_dir=gs://b/data")
    argv.append(f"--config.{key}={value}")
  argv += [f"--beam_runner={RUNNERS[args.runner]}", f"--beam_options={shlex.join(options)}"]
  out.append(Command(tuple(argv), description=f"prepare the data on {RUNNERS[args.runner]}"))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--runner", choices=sorted(RUNNERS), default="dataflow")
  p.add_argument("--name", default="two-tower-prepare", help="the job's name")
  p.add_argument("--config", default="configs/synthetic.py", help="config file (repo-relative)")
  p.add_argument("--workdir", default=None, help="work directory (gs:// for Dataflow)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set data.data_dir=gs://b/data (repeatable)")
  p.add_argument("--image", default=None,
                 help="worker container with this repository installed (Dataflow: optional)")
  p.add_argument("--python", default="python3")
  # Dataflow
  p.add_argument("--project", default=None)
  p.add_argument("--region", default=None)
  p.add_argument("--bucket", default=None, help="gs:// bucket for Dataflow's staging and temp files")
  p.add_argument("--num_workers", type=int, default=4, help="workers at start")
  p.add_argument("--max_workers", type=int, default=64, help="autoscaling's ceiling")
  p.add_argument("--machine_type", default="n2-standard-4")
  p.add_argument("--disk_gb", type=int, default=50, help="each worker's disk (shuffle spills)")
  p.add_argument("--service_account", default=None)
  p.add_argument("--wheel_dir", default="dist")
  # Flink / Spark
  p.add_argument("--flink_master", default=None, help="HOST:PORT of the Flink REST endpoint")
  p.add_argument("--spark_master", default=None, help="spark://HOST:PORT")
  p.add_argument("--parallelism", type=int, default=16, help="Flink / Spark tasks")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands and do nothing")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.num_workers < 1 or args.max_workers < args.num_workers:
    raise SystemExit("--num_workers must be at least 1 and at most --max_workers")
  return common.execute(commands(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
