"""End-to-end tests against a real kube-apiserver + etcd (see README.md)."""
