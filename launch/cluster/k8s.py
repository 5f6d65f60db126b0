"""Kubernetes: renders the manifest of a multi-host job (Indexed Job + headless Service, or a JobSet)
and applies it with kubectl.

  python -m launch.cluster.k8s --name=tt --image=REGISTRY/two-tower:TAG --num_processes=4 \\
      --gpus_per_process=8 --pvc=shared-runs --workdir=/mnt/shared/runs/tt --set mesh.model=8 --dry-run
  python -m launch.cluster.k8s --kind=jobset --name=tt --image=... --num_processes=4 \\
      --tpu=tpu-v5-lite-podslice --tpu_topology=4x4 --tpus_per_process=4 ...
  python -m launch.cluster.k8s --kind=cronjob --name=tt-nightly --image=... --pvc=shared-runs \\
      --workdir=/mnt/shared/nightly --config=configs/nightly.py --schedule="0 3 * * *" --dry-run

Pod i of the job is JAX process i: every pod gets JAX_COORDINATOR_ADDRESS (pod 0's stable DNS name
under the headless service), JAX_NUM_PROCESSES and JAX_PROCESS_ID (its completion index), which
two_tower.distributed reads; no Kubernetes API access (RBAC) is needed. A failed pod fails the
whole job (backoffLimit 0; a JobSet restarts all pods together, up to --max_restarts): the
processes of a JAX job cannot continue without one of them, and a restarted job resumes from its
last checkpoint. The image must contain this repository at --code_dir with its dependencies.

--kind=cronjob: the nightly lifecycle (python -m launch.nightly --date=yesterday, one process) on a
schedule. concurrencyPolicy Forbid: a day still running when the next is due is not run twice at
once (the next starts at its following schedule, and days run in order). A crashed pod is retried
(a rerun finishes the day, see launch/nightly_jobs.py); exit status 2 (bad input, a failed gate)
fails the job at once, as a retry would only report the finished day.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from launch.cluster import common
from launch.cluster.common import Command, env_pairs

INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SHARED_MOUNT = "/mnt/shared"


def coordinator_host(args: argparse.Namespace) -> str:
  """Pod 0's hostname.subdomain: Indexed Job pods are <job>-<index>; JobSet pods are
  <jobset>-<replicated job>-<job index>-<pod index>, and the JobSet's subdomain is its name."""
  if args.kind == "jobset":
    return f"{args.name}-workers-0-0.{args.name}"
  return f"{args.name}-0.{args.name}"


def _container(args: argparse.Namespace) -> dict[str, Any]:
  env = []
  if args.kind != "cronjob":  # one process: no coordinator
    env = [
        {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{coordinator_host(args)}:{args.port}"},
        {"name": "JAX_NUM_PROCESSES", "value": str(args.num_processes)},
        {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}},
        {"name": "JAX_DISTRIBUTED_TIMEOUT", "value": str(args.timeout)},
    ]
  env += [{"name": key, "value": value} for key, value in env_pairs(args.env)]
  limits: dict[str, Any] = {}
  if args.gpus_per_process:
    limits["nvidia.com/gpu"] = args.gpus_per_process
  if args.tpu:
    limits["google.com/tpu"] = args.tpus_per_process
  resources: dict[str, Any] = {"limits": limits} if limits else {}
  if args.cpu or args.memory:
    requests = {k: v for k, v in (("cpu", args.cpu), ("memory", args.memory)) if v}
    resources["requests"] = requests
  mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # NCCL and grain workers use shared memory
  if args.pvc:
    mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
  command = common.job_argv(args, python=args.python)
  if args.kind == "cronjob":
    command.append("--date=yesterday")  # the day that has just ended (UTC)
  container = {
      "name": "jax",
      "image": args.image,
      "imagePullPolicy": "IfNotPresent",
      "workingDir": args.code_dir,
      "command": command,
      "env": env,
      "volumeMounts": mounts,
  }
  if args.kind != "cronjob":
    container["ports"] = [{"containerPort": args.port, "name": "coordinator"}]
  if resources:
    container["resources"] = resources
  return container


def _pod_spec(args: argparse.Namespace) -> dict[str, Any]:
  volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  if args.pvc:
    volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": args.pvc}})
  spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [_container(args)],
                          "volumes": volumes}
  if args.kind == "job":
    spec["subdomain"] = args.name  # with the headless Service: <job>-<i>.<name> resolves to pod i
  if args.tpu:
    spec["nodeSelector"] = {"cloud.google.com/gke-tpu-accelerator": args.tpu}
    if args.tpu_topology:
      spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"] = args.tpu_topology
  if args.service_account:
    spec["serviceAccountName"] = args.service_account
  return spec


def _job_spec(args: argparse.Namespace) -> dict[str, Any]:
  return {
      "completionMode": "Indexed",
      "completions": args.num_processes,
      "parallelism": args.num_processes,
      "backoffLimit": 0,
      "template": {"metadata": {"labels": {"app": args.name}}, "spec": _pod_spec(args)},
  }


def _cron_job(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
  return {
      "apiVersion": "batch/v1",
      "kind": "CronJob",
      "metadata": meta,
      "spec": {
          "schedule": args.schedule,
          "timeZone": args.time_zone,
          "concurrencyPolicy": "Forbid",
          "startingDeadlineSeconds": args.starting_deadline,
          "successfulJobsHistoryLimit": 7,
          "failedJobsHistoryLimit": 7,
          "jobTemplate": {"spec": {
              "backoffLimit": args.retries,
              "podFailurePolicy": {"rules": [{
                  "action": "FailJob",
                  "onExitCodes": {"containerName": "jax", "operator": "In", "values": [2]}}]},
              "template": {"metadata": {"labels": {"app": args.name}}, "spec": _pod_spec(args)},
          }},
      },
  }


def manifests(args: argparse.Namespace) -> list[dict[str, Any]]:
  meta = {"name": args.name, "labels": {"app": args.name}}
  if args.namespace:
    meta["namespace"] = args.namespace
  if args.kind == "cronjob":
    return [_cron_job(args, meta)]
  if args.kind == "jobset":
    return [{
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": meta,
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{"name": "workers", "replicas": 1,
                                "template": {"spec": _job_spec(args)}}],
        },
    }]
  service = {
      "apiVersion": "v1",
      "kind": "Service",
      "metadata": dict(meta),
      "spec": {
          "clusterIP": "None",
          # Pods resolve before they are ready: process 0 must be reachable while it starts.
          "publishNotReadyAddresses": True,
          "selector": {"job-name": args.name},
          "ports": [{"name": "coordinator", "port": args.port, "targetPort": args.port}],
      },
  }
  job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": dict(meta), "spec": _job_spec(args)}
  return [service, job]


def render(args: argparse.Namespace) -> str:
  return yaml.safe_dump_all(manifests(args), sort_keys=False)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--kind", choices=("job", "jobset", "cronjob"), default="job",
                 help="cronjob: the nightly job (launch.nightly) on --schedule")
  p.add_argument("--name", default="two-tower", help="job name (a DNS label)")
  p.add_argument("--namespace", default=None)
  p.add_argument("--image", required=True, help="container image with this repository")
  p.add_argument("--code_dir", default="/app", help="where the repository is in the image")
  p.add_argument("--python", default="python")
  p.add_argument("--num_processes", type=int, default=None,
                 help="pods = JAX processes (hosts); required for job and jobset")
  p.add_argument("--gpus_per_process", type=int, default=0)
  p.add_argument("--tpu", default=None, help="GKE TPU accelerator, e.g. tpu-v5-lite-podslice")
  p.add_argument("--tpu_topology", default=None, help="e.g. 4x4")
  p.add_argument("--tpus_per_process", type=int, default=4, help="TPU chips per host")
  p.add_argument("--cpu", default=None, help="CPU request per pod, e.g. 32")
  p.add_argument("--memory", default=None, help="memory request per pod, e.g. 200Gi")
  p.add_argument("--pvc", default=None, help=f"PersistentVolumeClaim mounted at {SHARED_MOUNT}")
  p.add_argument("--service_account", default=None)
  p.add_argument("--port", type=int, default=8476, help="coordinator port")
  p.add_argument("--timeout", type=int, default=600, help="seconds pods wait for each other")
  p.add_argument("--max_restarts", type=int, default=3, help="jobset: restarts of the whole set")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
  p.add_argument("--schedule", default="0 3 * * *", help="cronjob: cron schedule")
  p.add_argument("--time_zone", default="Etc/UTC", help="cronjob: the schedule's time zone")
  p.add_argument("--starting_deadline", type=int, default=6 * 3600,
                 help="cronjob: seconds after its time a missed run may still start")
  p.add_argument("--retries", type=int, default=2, help="cronjob: pod retries after a crash")
  common.add_job_flags(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.kind == "cronjob":
    if args.num_processes not in (None, 1):
      raise SystemExit("--kind=cronjob runs the nightly job, which runs in one process: drop "
                       "--num_processes")
    args.job, args.num_processes = "nightly", 1
    if args.config == parser().get_default("config"):
      args.config = "configs/nightly.py"
  elif args.num_processes is None or args.num_processes < 1:
    raise SystemExit(f"--kind={args.kind} needs --num_processes of at least 1")
  text = render(args)
  if args.dry_run:
    print(text, end="")
    return 0
  return common.execute([Command(("kubectl", "apply", "-f", "-"), stdin=text,
                                 description=f"apply {args.kind} {args.name}")], dry_run=False)


if __name__ == "__main__":
  sys.exit(main())
