"""`speechlm serve-ray`: the same OpenAI-compatible app as `speechlm serve`, run as Ray Serve replicas.

One process decodes on one device; Ray Serve spreads requests over N processes (or GPUs, or machines). Each replica
loads the model once and runs the whole `create_app` FastAPI app through `@serve.ingress`: the endpoints, the error
shapes, the `RequestGuard` middleware and one `DynamicBatcher` per replica. Nothing is re-implemented for Ray, so the
API cannot drift from the single-process server's.

Where each limit applies behind Ray's HTTP proxy:

- per replica (in the app, unchanged): API key, browser origin, upload size (Content-Length up front and bytes counted
  as they arrive), body stall timeout, requests in flight (`--max-concurrent-requests`, also Ray's
  `max_ongoing_requests`, so Ray routes elsewhere before a replica would answer 503), prompt/chat/audio limits,
  the request timeout, the generic 500 with a reference;
- in Ray's proxy (not ours): the connection-level guards of `guard.guarded_http_protocol` (header deadline, open
  connection cap) do not apply; keep-alive uses `--keep-alive-timeout`. Requests beyond every replica's capacity wait
  in Ray's queue (`--max-queued-requests`, -1 = unbounded); when it is full Ray answers its own 503 (not OpenAI-shaped).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass

from .app import add_serve_arguments, exposure_warning, settings_from_args
from .settings import ServerSettings

RAY_EXTRA = 'the "ray" extra: pip install -e ".[ray]" (or pip install "speechlm[ray]")'
APP_NAME = "speechlm"


def require_ray():
    """Ray is optional: say which extra installs it instead of a bare ImportError."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise SystemExit(f"error: this needs Ray Serve, {RAY_EXTRA} ({error})") from None
    return ray, serve


@dataclass(frozen=True)
class ModelOptions:
    """What a replica needs to load the model itself (the model never travels through Ray, only its folder's name)."""

    model: str
    device: str | None = None
    dtype: str | None = "auto"
    quantize: str = "none"
    threads: int | None = None


def load_replica_app(options: ModelOptions, settings: ServerSettings):
    """Runs once in each replica: load the model, build the single-process app around it."""
    import torch

    from ..cli_options import resolve_device
    from ..loading import load_pretrained
    from .app import create_app
    from .guard import install_log_limits

    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    processor, model = load_pretrained(options.model, dtype=options.dtype, device=device, quantize=options.quantize,
                                       merge_lora=True)  # fmt: skip
    install_log_limits()
    return create_app(model, processor, settings)


def replica_ready(app) -> None:
    """Ray's health check: raises when this replica can no longer decode (its batcher closed or its worker died),
    so Ray replaces it instead of routing requests to it."""
    batcher = getattr(getattr(app, "state", None), "batcher", None)
    if batcher is None:
        raise RuntimeError("the SpeechLM app has no batcher (model not loaded)")
    if getattr(batcher, "_closed", False):
        raise RuntimeError("the batcher is closed")
    worker = getattr(batcher, "_thread", None)
    if worker is not None and not worker.is_alive():
        raise RuntimeError("the batcher's decoding thread died")


@dataclass(frozen=True)
class ScalingOptions:
    """How many replicas and what each one holds. `min_replicas`/`max_replicas` turn on Ray's autoscaler (it starts
    at `replicas` and aims at `target_ongoing_requests` per replica); without them the count is fixed."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_queued_requests: int = -1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0

    def deployment_options(self, settings: ServerSettings) -> dict:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        options = dict(
            # The guard's in-flight limit is the replica's: Ray routes past a full replica instead of a 503.
            max_ongoing_requests=settings.max_concurrent_requests,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options={"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            health_check_period_s=self.health_check_period_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )
        if self.min_replicas is None and self.max_replicas is None:
            return options | {"num_replicas": self.replicas}
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        if not 0 <= low <= self.replicas <= high:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {low} <= {self.replicas} <= {high}")
        # A replica is "busy" when it decodes a full batch: more requests than that wait, so add a replica.
        target = self.target_ongoing_requests or float(settings.max_batch_size)
        if target >= settings.max_concurrent_requests:
            raise ValueError(f"target_ongoing_requests ({target:g}) must be below max_concurrent_requests "
                             f"({settings.max_concurrent_requests})")  # fmt: skip
        autoscaling = {"min_replicas": low, "max_replicas": high, "initial_replicas": self.replicas,
                       "target_ongoing_requests": target}  # fmt: skip
        return options | {"autoscaling_config": autoscaling}


def build_application(options: ModelOptions, settings: ServerSettings, scaling: ScalingOptions = ScalingOptions()):
    """The Ray Serve application: one deployment whose replicas each run `create_app` on their own model copy."""
    _, serve = require_ray()

    def build_app():  # evaluated inside each replica (serve.ingress's builder form): the model loads there
        return load_replica_app(options, settings)

    @serve.ingress(build_app)
    class SpeechLMReplica:
        async def check_health(self) -> None:
            replica_ready(self.app)

        async def replica_stats(self) -> dict:
            """This replica's id and batching counters (HTTP /health answers for whichever replica Ray picks)."""
            return {"replica": serve.get_replica_context().replica_id.unique_id, **self.app.state.batcher.stats()}

    return serve.deployment(SpeechLMReplica, name="SpeechLM", **scaling.deployment_options(settings)).bind()


def start(application, host: str = "127.0.0.1", port: int = 8000, keep_alive_timeout: float = 5.0,
          name: str = APP_NAME) -> str:  # fmt: skip
    """Start Serve's HTTP proxy on host:port and deploy `application` at "/"; returns once its replicas are healthy.

    Ray must be initialised (`ray.init`); the base URL is returned."""
    _, serve = require_ray()
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": max(1, round(keep_alive_timeout))})
    serve.run(application, name=name, route_prefix="/")
    return f"http://{host}:{port}"


def add_serve_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`speechlm serve`'s flags (same names, same meaning, per replica) plus the Ray ones."""
    add_serve_arguments(parser)
    ray_flags = parser.add_argument_group("Ray Serve")
    ray_flags.add_argument("--replicas", type=int, default=2,
                           help="model replicas (each loads the model once; the starting count under autoscaling)")
    ray_flags.add_argument("--min-replicas", type=int, default=None, help="turns on autoscaling: fewest replicas")
    ray_flags.add_argument("--max-replicas", type=int, default=None, help="turns on autoscaling: most replicas")
    ray_flags.add_argument("--target-ongoing-requests", type=float, default=None,
                           help="autoscaling aims at this many requests per replica (default: --max-batch-size)")
    ray_flags.add_argument("--max-queued-requests", type=int, default=-1,
                           help="requests waiting in Ray for a free replica; more get Ray's 503 (-1: no limit)")
    ray_flags.add_argument("--replica-cpus", type=float, default=1.0,
                           help="CPUs reserved per replica (torch uses this many threads unless --threads)")
    ray_flags.add_argument("--replica-gpus", type=float, default=None,
                           help="GPUs per replica (default: 1 with --device cuda, else 0; 0.5 packs two per GPU)")
    ray_flags.add_argument("--address", default=None,
                           help="Ray cluster to join (e.g. auto, ray://head:10001; default: $RAY_ADDRESS, else a "
                                "new local one)")  # fmt: skip
    ray_flags.add_argument("--drain-seconds", type=float, default=30.0,
                           help="on SIGTERM/SIGINT, how long replicas may finish their requests")  # fmt: skip


def scaling_from_args(args: argparse.Namespace) -> ScalingOptions:
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if (args.device or "").startswith("cuda") else 0.0
    return ScalingOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          target_ongoing_requests=args.target_ongoing_requests,
                          max_queued_requests=args.max_queued_requests, num_cpus=args.replica_cpus, num_gpus=gpus,
                          graceful_shutdown_timeout_s=args.drain_seconds)  # fmt: skip


def run_serve_ray(args: argparse.Namespace) -> int:
    ray, serve = require_ray()
    settings = settings_from_args(args)
    options = ModelOptions(model=os.path.abspath(args.model), device=args.device, dtype=args.dtype,
                           quantize=args.quantize, threads=args.threads)  # fmt: skip
    try:
        application = build_application(options, settings, scaling_from_args(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ray.init(address=args.address, logging_level="WARNING")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        url = start(application, args.host, args.port, settings.keep_alive_timeout)
        shown = {k: v for k, v in asdict(settings).items() if k != "api_key"}
        print(f"serving {args.model} on {url} with Ray Serve ({args.replicas} replica(s)); auth: "
              f"{bool(settings.api_key)}; {shown}", flush=True)  # fmt: skip
        if warning := exposure_warning(args.host, settings.api_key):
            print(warning, file=sys.stderr)
        while not stop.wait(1.0):
            pass
        print("shutting down: replicas finish their requests, then stop", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s), then the app's lifespan closes its batcher
        ray.shutdown()
    return 0


add_arguments = add_serve_ray_arguments
run = run_serve_ray

__all__ = ["ModelOptions", "ScalingOptions", "build_application", "replica_ready", "run_serve_ray", "start"]
