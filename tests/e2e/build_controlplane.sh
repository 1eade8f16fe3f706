#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# etcd, kubectl) from the pinned Go modules in tests/e2e/controlplane and
# tests/e2e/etcd.
#
# Binaries go to a cache directory outside the repository, keyed by version:
#   ${ECR_WEBHOOK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ecr-webhook}/controlplane/k8s-vX.Y.Z-etcd-vA.B.C/
# If all four binaries are already there, nothing is built. Otherwise only the
# missing ones are built (a cache filled before kube-controller-manager was added
# keeps its three binaries and gains the fourth).
#
# stdout: exactly one line, the directory holding the binaries.
# stderr: progress, go's output and the build time.
# Needs only a Go toolchain (>= the go directive in the go.mod files) and access
# to the Go module proxy; `go build` downloads the modules it needs.
#
# Environment: GO (go binary to use), ECR_WEBHOOK_CACHE (cache root).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cp_mod="$here/controlplane"
etcd_mod="$here/etcd"

log() { printf '[build_controlplane] %s\n' "$*" >&2; }

# The pinned versions live in the go.mod files; read them from there.
mod_version() { # <go.mod> <module path>
	awk -v m="$2" '($1 == m && $2 ~ /^v/) || ($1 == "require" && $2 == m) { print ($1 == m ? $2 : $3); exit }' "$1"
}
k8s_version="$(mod_version "$cp_mod/go.mod" k8s.io/kubernetes)"
etcd_version="$(mod_version "$etcd_mod/go.mod" go.etcd.io/etcd/server/v3)"
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
	log "cannot read pinned versions from $cp_mod/go.mod / $etcd_mod/go.mod"
	exit 1
fi

cache_root="${ECR_WEBHOOK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ecr-webhook}"
out="$cache_root/controlplane/k8s-${k8s_version}-etcd-${etcd_version}"
k8s_binaries=(kube-apiserver kube-controller-manager kubectl)
binaries=("${k8s_binaries[@]}" etcd)

have_all() {
	local b
	for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

# The binaries not yet in $out, space-separated.
missing() {
	local b list=()
	for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || list+=("$b"); done
	printf '%s\n' "${list[*]}"
}

if have_all; then
	printf '%s\n' "$out"
	exit 0
fi

mkdir -p "$cache_root/controlplane"
# Serialise concurrent builds (e.g. two test sessions starting at once).
exec 9>"$cache_root/controlplane/.build.lock"
if command -v flock >/dev/null 2>&1; then
	flock 9
	if have_all; then
		printf '%s\n' "$out"
		exit 0
	fi
fi

GO="${GO:-$(command -v go || true)}"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi
if [[ -z "$GO" ]]; then
	log "no Go toolchain found: put go on PATH or set GO=/path/to/go"
	exit 1
fi
go_version="$("$GO" version)" || { log "'$GO version' failed"; exit 1; }
log "using $go_version"
read -r -a todo <<<"$(missing)"
log "building ${todo[*]} (kubernetes ${k8s_version}, etcd ${etcd_version}) into $out"

# Build into a scratch directory next to the target and rename at the end, so an
# interrupted build never leaves a half-populated cache directory or a partly
# written binary behind.
tmp="$(mktemp -d "$cache_root/controlplane/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Same version stamping as kubernetes' hack/lib/version.sh, minus the git data
# we do not have; buildDate keeps its 1970 default so builds are reproducible.
minor="${k8s_version#v1.}"
minor="${minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	k8s_ldflags+=" -X ${pkg}.gitVersion=${k8s_version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
	k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
done

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
start=$(date +%s)
k8s_pkgs=()
for b in "${todo[@]}"; do
	[[ "$b" == etcd ]] || k8s_pkgs+=("./cmd/$b")
done
if ((${#k8s_pkgs[@]})); then
	(cd "$cp_mod" && "$GO" build -trimpath -ldflags "$k8s_ldflags" -o "$tmp/" "${k8s_pkgs[@]}")
fi
if [[ " ${todo[*]} " == *" etcd "* ]]; then
	(cd "$etcd_mod" && "$GO" build -trimpath -ldflags "-s -w" -o "$tmp/" ./cmd/etcd)
fi
end=$(date +%s)

for b in "${todo[@]}"; do
	[[ -x "$tmp/$b" ]] || { log "build produced no $b"; exit 1; }
done
if [[ -d "$out" ]]; then
	# Add to the binaries already there; each rename is atomic.
	for b in "${todo[@]}"; do mv -f "$tmp/$b" "$out/$b"; done
	rm -rf "$tmp"
else
	mv "$tmp" "$out"
fi
trap - EXIT
chmod 755 "$out"
log "build time: $((end - start))s"
printf '%s\n' "$out"
