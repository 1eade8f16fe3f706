"""ecr-webhook: keep Amazon EKS system images pullable, at admission time.

The package is split into a pure core (no I/O, no flask/boto3/kubernetes imports;
enforced by import-linter, see pyproject.toml) and thin shells around it:

core:   imageref, ecr, policy, plan, patch, objects, review, audit, errors
shells: cli, dryrun, app, server, certs, auditlog, metrics, bootstrap
"""

__version__ = "0.1.0"
