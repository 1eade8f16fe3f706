"""The seed case of issue 8, end to end, against real registries on loopback.

Run from the repository root: ``.venv/bin/python tools/probe-seed-case.py``.
docs/readme/probing.md shows its output.

Two Debian ``docker-registry`` instances (CNCF Distribution) with TLS and
htpasswd stand in for the EKS registries of eu-central-1 and us-west-2; both
hold the VPC CNI images.  moto in server mode is the ECR API
(``AWS_ENDPOINT_URL_ECR``): its token is ``AWS:<password>``.  The us-west-2
registry accepts that password; the eu-central-1 one does not, so it answers
401 to the token, as the real eu-central-1 registry did for the cluster that
started this project.  Then ``ecr-webhook dry-run --probe`` and
``ecr-webhook probe`` run exactly as an operator would type them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.registry_support import (  # noqa: E402
    CertAuthority,
    MotoServer,
    Registry,
    aws_env,
    ecr_token,
)

EU = "602401143452.dkr.ecr.eu-central-1.amazonaws.com"
US = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
TAG = "v1.19.2-eksbuild.1"
POD = f"""\
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: aws-node, namespace: kube-system}}
spec:
  selector: {{matchLabels: {{k8s-app: aws-node}}}}
  template:
    metadata: {{labels: {{k8s-app: aws-node}}}}
    spec:
      initContainers:
      - {{name: aws-vpc-cni-init, image: {EU}/amazon-k8s-cni-init:{TAG}}}
      containers:
      - {{name: aws-node, image: {EU}/amazon-k8s-cni:{TAG}}}
"""


def show(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    shown = " ".join(shlex.quote(a) if not a.startswith("$") else a for a in argv)
    print(f"$ {shown}")
    real = [a.replace("$EU_URL", EU_URL).replace("$US_URL", US_URL).replace("$CA", CA)
            for a in argv]  # fmt: skip
    exe = str(Path(sys.executable).with_name("ecr-webhook"))
    r = subprocess.run([exe, *real[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                       check=False)  # fmt: skip
    sys.stdout.write(r.stdout + r.stderr)
    print(f"(exit {r.returncode})\n")


if __name__ == "__main__":
    tmp = Path(tempfile.mkdtemp(prefix="seed-case-"))
    ca = CertAuthority(tmp / "ca")
    moto = MotoServer(tmp / "moto").start()
    token = ecr_token(moto.url, "eu-central-1")
    eu = Registry("eu-central-1", ca, tmp / "eu", {"AWS": "not-the-ecr-token"}).start()
    us = Registry("us-west-2", ca, tmp / "us", {token.user: token.password}).start()
    try:
        for r in (eu, us):
            for repo in ("amazon-k8s-cni", "amazon-k8s-cni-init"):
                r.push_image(repo, TAG)
        (tmp / "aws-node.yaml").write_text(POD)
        EU_URL, US_URL, CA = eu.url, us.url, str(ca.ca_file)
        print(f"# eu-central-1 stand-in: {eu.url} (refuses the token); "
              f"us-west-2 stand-in: {us.url}; AWS_ENDPOINT_URL_ECR={moto.url} (moto)\n")
        env = aws_env(moto.url)
        flags = ["--region", "eu-central-1", "--fallback-region", "us-west-2",
                 "--registry-endpoint", f"{EU}=$EU_URL", "--registry-endpoint", f"{US}=$US_URL",
                 "--registry-ca", "$CA"]  # fmt: skip
        show(["ecr-webhook", "dry-run", "--probe", *flags, "-f", "aws-node.yaml"], env, tmp)
        show(["ecr-webhook", "probe", f"{EU}/amazon-k8s-cni:{TAG}", *flags], env, tmp)
        show(["ecr-webhook", "probe", f"{EU}/amazon-k8s-cni:v9.9.9", *flags], env, tmp)
        show(["ecr-webhook", "dry-run", "--probe", *flags, "-f", "aws-node.yaml", "-o", "json"],
             env, tmp)  # fmt: skip
    finally:
        eu.stop()
        us.stop()
        moto.stop()
