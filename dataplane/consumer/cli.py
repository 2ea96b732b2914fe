"""``dsn consumer``: the HPC consumer command (also ``python -m dataplane.consumer``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from common.clitypes import ControlPlaneURLs


@click.group()
def consumer() -> None:
    """Receive, count and store a session's data on HPC nodes (run under mpiexec or srun)."""


@consumer.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="DSN configuration file (YAML).")
@click.option("--session", required=True, help="Session id in the configuration.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the per-scan HDF5 files (written by rank 0); results name "
                   "them by absolute path.")
@click.option("--scans", type=click.IntRange(min=1), default=None,
              help="Exit after this many scans [default: run until SIGTERM/SIGINT].")
@click.option("--drain-s", type=click.FloatRange(min=0), envvar="DSN_CONSUMER_DRAIN_S",
              default=20.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM, SIGINT or SIGUSR1, take no new scan but finish, write and report "
                   "those already under way for at most this long, then leave (env "
                   "DSN_CONSUMER_DRAIN_S); a second signal stops at once. Keep it below the time "
                   "the batch system or launcher allows between its signal and SIGKILL (Slurm's "
                   "KillWait, 30 s by default; the local launcher's grace_s, 30 s).")
@click.option("--gateway-lost-s", type=click.FloatRange(min=0, min_open=True),
              envvar="DSN_CONSUMER_GATEWAY_LOST_S", default=30.0, show_default=True,
              metavar="SECONDS",
              help="With --controlplane: once a heartbeat says the session moved to another "
                   "gateway, a scan begun before that receives nothing for this long is closed "
                   "partial, every sector that never came listed gateway_lost (env "
                   "DSN_CONSUMER_GATEWAY_LOST_S). A producer that streams the scan again through "
                   "the new gateway keeps it open; give such producers the time to do so. In any "
                   "job, a scan split over lanes that receives nothing for this long after one "
                   "of its lanes ended is closed too, the other lanes' sectors listed lane_lost.")
@click.option("--dark", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Dark reference: a frame-shaped float32 .npy file.")
@click.option("--samples", type=click.IntRange(min=1), default=40, show_default=True,
              help="Sample frames per scan for the thresholds, across all ranks.")
@click.option("--background-sigma", type=float, default=4.0, show_default=True,
              help="Background threshold in standard deviations.")
@click.option("--xray-sigma", type=float, default=10.0, show_default=True,
              help="X-ray threshold in standard deviations.")
@click.option("--kernel", type=click.Choice(["vectorised", "stempy"]), default="vectorised",
              show_default=True, help="Electron-counting kernel.")
@click.option("--result-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append scan results as JSON lines here [default: stdout without a control "
                   "plane, none with one].")
@click.option("--controlplane", "controlplane_urls", type=ControlPlaneURLs(),
              envvar="DSN_CONTROLPLANE_URL", default=None, metavar="URL[,URL...]",
              help="Register with this control plane (env DSN_CONTROLPLANE_URL): each rank binds "
                   "an ephemeral port, registers it and reports results there. Without it, rank "
                   "r binds the session's consumer endpoint r from --config. Where the control "
                   "plane runs as several replicas, all their URLs comma-separated: a call that "
                   "cannot connect to one goes to the next.")
@click.option("--token-file", envvar="DSN_CONSUMER_TOKEN_FILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the consumer token, mode 0600 (env DSN_CONSUMER_TOKEN_FILE); "
                   "needed with --controlplane.")
@click.option("--bind-host", envvar="DSN_CONSUMER_BIND_HOST", default="127.0.0.1",
              show_default=True, metavar="IP|route:HOST",
              help="With --controlplane: the address ranks listen on, as the gateway reaches it "
                   "(env DSN_CONSUMER_BIND_HOST). route:HOST is the address each node reaches "
                   "HOST by: name the gateway as compute nodes reach it, and every rank picks "
                   "its own node's address on that network.")
@click.option("--job-id", envvar=["DSN_JOB_ID", "SLURM_JOB_ID"], default=None,
              help="With --controlplane: the job id ranks register under (env DSN_JOB_ID or "
                   "SLURM_JOB_ID) [default: a new id shared by all ranks].")
def consumer_run(config_path: Path, session: str, output_dir: Path, scans: int | None,
                 drain_s: float, gateway_lost_s: float,
                 dark: Path | None, samples: int, background_sigma: float, xray_sigma: float,
                 kernel: str, result_file: Path | None,
                 controlplane_urls: tuple[str, ...] | None,
                 token_file: Path | None, bind_host: str, job_id: str | None) -> None:
    """Receive, count and write a session's scans; one rank per consumer endpoint."""
    # Imported here so that other dsn commands never initialise MPI.
    from dataplane.consumer.registration import RegistrationArguments
    from dataplane.consumer.runner import JobArguments, run_job

    registration = None
    if controlplane_urls is not None:
        if token_file is None:
            raise click.UsageError("--controlplane needs --token-file (or DSN_CONSUMER_TOKEN_FILE)")
        registration = RegistrationArguments(controlplane_urls=controlplane_urls,
                                             token_file=token_file, bind_host=bind_host,
                                             job_id=job_id)
    code = run_job(JobArguments(
        config=config_path, session=session, output_dir=output_dir, scans=scans, dark=dark,
        samples=samples, background_sigma=background_sigma, xray_sigma=xray_sigma, kernel=kernel,
        result_file=result_file, registration=registration, drain_s=drain_s,
        gateway_lost_s=gateway_lost_s))
    sys.exit(code)
