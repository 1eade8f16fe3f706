"""The ``ecr-webhook`` command line: a thin shell over the library.

Heavy modules (boto3, kubernetes, flask, gunicorn) are imported inside the
commands that need them, so ``ecr-webhook --help`` starts fast (bench/startup.py
measures it).  Errors are mapped to exit codes in exactly one place, ``main``:
an ``EcrWebhookError`` prints one line naming the file, field or value and exits
with its ``exit_code``; nothing the user typed produces a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from webhook import __version__
from webhook.core.errors import EcrWebhookError

OUTPUTS = ("diff", "patch", "yaml", "json")
PORT = click.IntRange(1, 65535)
NODE_OSES = ("bottlerocket", "al2", "al2023", "containerd")
DAYS = click.IntRange(1, 3650)  # at most ten years: a certificate is meant to rotate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ecr-webhook")
def cli() -> None:
    """Keep Amazon EKS system images pullable: a mutating admission webhook."""


def probe_options(f: Any) -> Any:
    """The probing flags of dry-run, serve and probe (issue 8; names are a contract)."""
    for option in reversed((
        click.option("--probe", "probe", is_flag=True,
                     help="Probe registries for availability (ECR token + manifest HEAD)."),
        click.option("--fallback-region", "fallback_regions", multiple=True, metavar="R",
                     help="Also try the EKS registry of region R (repeatable; replaces the "
                          "policy's fallbackRegions)."),
        click.option("--registry-endpoint", "registry_endpoints", multiple=True,
                     metavar="HOST=URL", help="Probe registry HOST at URL (repeatable)."),
        click.option("--registry-ca", type=click.Path(dir_okay=False),
                     help="Extra CA certificates (PEM) for registry TLS."),
        click.option("--probe-timeout", type=float, metavar="SECONDS",
                     help="Probe budget of one admission (default 1, or the policy's)."),
    )):  # fmt: skip
        f = option(f)
    return f


def _probe_opts(enabled: bool, kw: dict[str, Any]) -> Any:
    from webhook.prober import ProbeOptions

    return ProbeOptions(enabled, tuple(kw["fallback_regions"]), tuple(kw["registry_endpoints"]),
                        kw["registry_ca"], kw["probe_timeout"])  # fmt: skip


@cli.command("dry-run")
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    help="Manifest file, directory or - for stdin (repeatable). YAML or JSON.",
)
@click.option("--region", help="Cluster region (default: policy, then AWS_REGION).")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    help="Policy YAML file (the ConfigMap content).",
)
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="diff", show_default=True)
@probe_options
def dry_run(
    files: tuple[str, ...], region: str | None, policy_file: str | None, output: str,
    probe: bool, **kw: Any,
) -> None:  # fmt: skip
    """Show what the webhook would rewrite in manifests, without a cluster."""
    from webhook import dryrun

    code = dryrun.run(list(files), region, policy_file, output, os.environ, sys.stdout, sys.stderr,
                      probe=_probe_opts(probe, kw))  # fmt: skip
    sys.exit(code)


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True)  # nosec B104  # hostNetwork; the apiserver dials the node's address
@click.option("--port", type=PORT, default=8443, show_default=True)
@click.option("--metrics-port", type=PORT, default=9090, show_default=True)
@click.option("--cert-file", default="/etc/ecr-webhook/tls/tls.crt", show_default=True)
@click.option("--key-file", default="/etc/ecr-webhook/tls/tls.key", show_default=True)
@click.option("--policy", "policy_file", help="Policy YAML file; re-read when it changes.")
@click.option("--region", help="Cluster region (default: policy, then AWS_REGION).")
@click.option("--audit-log", default="-", show_default=True, help="Audit file, or - for stdout.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option(
    "--dev",
    is_flag=True,
    help="Loopback certificate in certs/, serve on 127.0.0.1, print a webhook config.",
)
@click.option("--read-timeout", type=click.FloatRange(0.1, 300), default=5.0, show_default=True,
              help="Seconds a request (headers and body) may take to arrive; then it is dropped.")
@click.option("--client-ca", help="PEM CA file: require client certificates it signed (mTLS).")
@click.option("-v", "--verbosity", type=int, default=0, help="Log verbosity (klog-style v).")
@probe_options
def serve(
    host: str,
    port: int,
    metrics_port: int,
    cert_file: str,
    key_file: str,
    policy_file: str | None,
    region: str | None,
    audit_log: str,
    workers: int,
    threads: int,
    dev: bool,
    read_timeout: float,
    client_ca: str | None,
    verbosity: int,
    probe: bool,
    **kw: Any,
) -> None:
    """Serve /mutate over TLS with gunicorn (metrics on a plain-HTTP port)."""
    from webhook.config import ServeConfig
    from webhook.server import run

    config = ServeConfig(
        host=host,
        port=port,
        metrics_port=metrics_port,
        cert_file=cert_file,
        key_file=key_file,
        policy_file=policy_file,
        region=region,
        audit_log=audit_log,
        workers=workers,
        threads=threads,
        dev=dev,
        log_verbosity=verbosity,
        probe=probe,
        fallback_regions=tuple(kw["fallback_regions"]),
        registry_endpoints=tuple(kw["registry_endpoints"]),
        registry_ca=kw["registry_ca"],
        probe_timeout=kw["probe_timeout"],
        read_timeout=read_timeout,
        client_ca=client_ca,
    )
    sys.exit(run(config))


@cli.command("probe")
@click.argument("image")
@click.option("--region", help="Cluster region (default: policy, then AWS_REGION).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Policy YAML file.")
@click.option("-o", "--output", type=click.Choice(("text", "json")), default="text",
              show_default=True)  # fmt: skip
@probe_options
def probe_cmd(image: str, region: str | None, policy_file: str | None, output: str,
              probe: bool, **kw: Any) -> None:  # fmt: skip
    """Probe IMAGE and each candidate: what each answered, how fast, and the pick."""
    from webhook import prober

    sys.exit(prober.doctor(image, region, policy_file, _probe_opts(True, kw), os.environ,
                           output, sys.stdout))  # fmt: skip


@cli.group()
def certs() -> None:
    """Serving certificates for the webhook."""


@certs.command("generate")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@click.option("--service", help="Service name (adds S, S.N, S.N.svc, S.N.svc.cluster.local).")
@click.option("--namespace", default="ecr-webhook", show_default=True)
@click.option("--dns", "dns", multiple=True, help="Extra DNS SAN (repeatable).")
@click.option("--ip", "ips", multiple=True, help="IP SAN (repeatable).")
@click.option("--days", type=DAYS, default=365, show_default=True)
def certs_generate(
    out_dir: str,
    service: str | None,
    namespace: str,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    days: int,
) -> None:
    """Write ca.crt, tls.crt and tls.key (mode 0600), as in a kubernetes.io/tls Secret."""
    from webhook import certs as c

    names = (c.service_names(service, namespace) if service else []) + list(dns)
    paths = c.write_bundle(c.build_certificate(names, ips, days=days), out_dir)
    for p in paths.values():
        click.echo(str(p))


@certs.command("bootstrap")
@click.option("--namespace", default="ecr-webhook", show_default=True)
@click.option("--service", default="ecr-webhook", show_default=True)
@click.option("--secret", default="ecr-webhook-tls", show_default=True)
@click.option(
    "--webhook",
    "webhook_name",
    default="ecr-webhook",
    show_default=True,
    help="MutatingWebhookConfiguration whose caBundle is patched.",
)
@click.option(
    "--renew-before",
    default="720h",
    show_default=True,
    help="Renew when the certificate expires within this duration.",
)
@click.option("--days", type=DAYS, default=365, show_default=True)
@click.option("--kubeconfig", default=None, help="Kubeconfig (default: in-cluster config).")
def certs_bootstrap(
    namespace: str,
    service: str,
    secret: str,
    webhook_name: str,
    renew_before: str,
    days: int,
    kubeconfig: str | None,
) -> None:
    """Create or renew the TLS Secret and patch the caBundle (idempotent)."""
    from webhook.bootstrap import BootstrapOptions, run

    sys.exit(
        run(
            BootstrapOptions(
                namespace=namespace,
                service=service,
                secret=secret,
                webhook=webhook_name,
                renew_before=renew_before,
                days=days,
                kubeconfig=kubeconfig,
            )
        )
    )


@cli.command("node-config")
@click.option("--os", "os_name", required=True, type=click.Choice(NODE_OSES))
@click.option("--region", required=True, help="The nodes' AWS region.")
@click.option("--pause-tag", help="eks/pause tag (default: what the OS images ship).")
@click.option("--mirror", help="REGISTRY[/PREFIX] holding eks/pause, instead of the EKS registry.")
@click.option("-o", "--output", type=click.Choice(("text", "json")), default="text")
def node_config(
    os_name: str, region: str, pause_tag: str | None, mirror: str | None, output: str
) -> None:
    """Print the node setting that points the sandbox (pause) image at a reachable registry."""
    import json

    from webhook.core.nodeconfig import render

    cfg = render(os_name, region, pause_tag=pause_tag, mirror=mirror)
    click.echo(json.dumps(cfg.to_json(), indent=2) if output == "json" else cfg.to_text())


@cli.command()
@click.option("--kubeconfig", help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).")
@click.option("--context", help="Kubeconfig context.")
@click.option("-n", "--namespace", help="Namespace (default: the context's).")
@click.option("-A", "--all-namespaces", is_flag=True)
@click.option("-o", "--output", type=click.Choice(("table", "json")), default="table")
@click.option("--region", help="Region for nodes whose region is unknown (default: policy).")
@click.option("--policy", "policy_file", help="Policy YAML (default: the webhook's ConfigMap).")
def scan(**kwargs: Any) -> None:
    """Explain image-pull failures of ECR images in a cluster and name their fixes."""
    from webhook.scan import ScanOptions, run

    if kwargs["namespace"] and kwargs["all_namespaces"]:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    sys.exit(run(ScanOptions(**kwargs), sys.stdout))


# fmt: off
@cli.command()
@click.argument("sources", nargs=-1, metavar="[SOURCE]...")
@click.option("--since", metavar="WHEN", help="Records at or after: a duration (2h) or RFC 3339.")
@click.option("--until", metavar="WHEN", help="Records before: a duration or RFC 3339.")
@click.option("--namespace", "namespaces", multiple=True, help="Pod namespace (repeatable).")
@click.option("--image", "images", multiple=True, metavar="GLOB",
              help="A container's from or to image matches (repeatable).")
@click.option("--reason", "reasons", multiple=True, help="Container reason code (repeatable).")
@click.option("--decision", "decisions", multiple=True,
              type=click.Choice(("patched", "unchanged", "skipped", "error")))
@click.option("--user", "users", multiple=True, help="Requesting username (repeatable).")
@click.option("--owner", "owners", multiple=True, metavar="KIND/NAME",
              help="Controlling owner, e.g. DaemonSet/aws-node (repeatable).")
@click.option("--dry-run/--no-dry-run", "dry_run", default=None,
              help="Only requests with (without) dryRun.  Default: both.")
@click.option("-o", "--output", type=click.Choice(("table", "json")), default="table",
              show_default=True, help="json: matching records as logged, one per line.")
@click.option("--summary", is_flag=True, help="Counts by route, reason, namespace, decision.")
@click.option("--cloudwatch-log-group", "log_group", metavar="GROUP",
              help="Read a CloudWatch Logs group (FilterLogEvents).")
@click.option("--log-stream-prefix", "stream_prefix", metavar="P",
              help="Only log streams starting with P.")
def audit(sources: tuple[str, ...], since: str | None, until: str | None,
          namespaces: tuple[str, ...], images: tuple[str, ...], reasons: tuple[str, ...],
          decisions: tuple[str, ...], users: tuple[str, ...], owners: tuple[str, ...],
          dry_run: bool | None, output: str, summary: bool, log_group: str | None,
          stream_prefix: str | None) -> None:
    """Query audit records: files, directories, gzip, - for stdin, or CloudWatch Logs.

    Exit status: 0 when records matched, 1 when none did, 2 for bad usage or
    unreadable input.
    """
    import time

    from webhook import auditread
    from webhook.core.auditquery import build_filters

    filters = build_filters(since=since, until=until, now=time.time(), namespaces=namespaces,
                            images=images, reasons=reasons, decisions=decisions, users=users,
                            owners=owners, dry_run=dry_run)
    query = auditread.Query(sources, filters, output, summary, log_group, stream_prefix)
    sys.exit(auditread.run(query, sys.stdout.buffer, sys.stderr))
# fmt: on


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI and map project errors to one-line messages and exit codes."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="ecr-webhook",
            standalone_mode=False,
        )
    except EcrWebhookError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
