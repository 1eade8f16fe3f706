"""The pure core: no I/O, and none of flask, boto3, kubernetes or gunicorn.

Image references (``imageref``), the ECR registry model (``ecr``), the rewrite
policy (``policy``), the planner (``plan``), the JSON patch builder (``patch``),
the AdmissionReview envelope (``review``), Kubernetes object walking
(``objects``), audit records (``audit``) and the exception hierarchy
(``errors``).  Everything here is plain functions over data, so every rule can
be tested without a server, a registry or a cluster.

The shells around it live one level up in ``webhook``: the Flask app and the
gunicorn server, the command line, the registry prober, the cluster adapters.
import-linter (pyproject.toml) and tests/test_architecture.py hold the line.
"""
